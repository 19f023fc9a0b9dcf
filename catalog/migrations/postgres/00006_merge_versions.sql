-- +goose Up
-- A version can be a merge: two devices' user files merged by the seed's
-- Table 1 (the check-in that did not start from the head, with the head).
ALTER TABLE versions DROP CONSTRAINT versions_kind_check;
ALTER TABLE versions ADD CONSTRAINT versions_kind_check CHECK (kind IN ('create', 'seal', 'check-in', 'conflict',
    'rollback', 'recompose', 'squash', 'import', 'snapshot', 'merge'));

-- +goose Down
DELETE FROM versions WHERE kind = 'merge';
ALTER TABLE versions DROP CONSTRAINT versions_kind_check;
ALTER TABLE versions ADD CONSTRAINT versions_kind_check CHECK (kind IN ('create', 'seal', 'check-in', 'conflict',
    'rollback', 'recompose', 'squash', 'import', 'snapshot'));
