-- +goose Up
-- A version can be a merge: two devices' user files merged by the seed's
-- Table 1 (the check-in that did not start from the head, with the head).
-- SQLite cannot change a CHECK constraint: the versions table is rebuilt.
CREATE TABLE versions_new (
    desktop      TEXT    NOT NULL,
    n            INTEGER  NOT NULL CHECK (n > 0),
    kind         TEXT    NOT NULL CHECK (kind IN ('create', 'seal', 'check-in', 'conflict',
                                                  'rollback', 'recompose', 'squash', 'import', 'snapshot', 'merge')),
    checkin      TEXT,
    created      TIMESTAMP NOT NULL,
    system_layer TEXT    NOT NULL,
    user_layer   TEXT    NOT NULL DEFAULT '',
    from_n       INTEGER  NOT NULL DEFAULT 0,
    device       TEXT    NOT NULL DEFAULT '',
    bytes        INTEGER  NOT NULL DEFAULT 0,
    note         TEXT    NOT NULL DEFAULT '',
    PRIMARY KEY (desktop, n),
    UNIQUE (desktop, checkin),
    CHECK ((checkin IS NULL) OR kind IN ('check-in', 'conflict', 'snapshot'))
) WITHOUT ROWID;
INSERT INTO versions_new SELECT * FROM versions;
DROP TABLE versions;
ALTER TABLE versions_new RENAME TO versions;

-- +goose Down
DELETE FROM versions WHERE kind = 'merge';
CREATE TABLE versions_new (
    desktop      TEXT    NOT NULL,
    n            INTEGER  NOT NULL CHECK (n > 0),
    kind         TEXT    NOT NULL CHECK (kind IN ('create', 'seal', 'check-in', 'conflict',
                                                  'rollback', 'recompose', 'squash', 'import', 'snapshot')),
    checkin      TEXT,
    created      TIMESTAMP NOT NULL,
    system_layer TEXT    NOT NULL,
    user_layer   TEXT    NOT NULL DEFAULT '',
    from_n       INTEGER  NOT NULL DEFAULT 0,
    device       TEXT    NOT NULL DEFAULT '',
    bytes        INTEGER  NOT NULL DEFAULT 0,
    note         TEXT    NOT NULL DEFAULT '',
    PRIMARY KEY (desktop, n),
    UNIQUE (desktop, checkin),
    CHECK ((checkin IS NULL) OR kind IN ('check-in', 'conflict', 'snapshot'))
) WITHOUT ROWID;
INSERT INTO versions_new SELECT * FROM versions;
DROP TABLE versions;
ALTER TABLE versions_new RENAME TO versions;
