-- +goose Up
-- A desktop's versions, one row each (until now a list inside the desktop's
-- record): how it was made (kind), the layers its disks stand on, and for a
-- check-in or a conflict the check-in's ID, unique within the desktop, so that a
-- commit retried after the catalog took it finds its version instead of adding a
-- second. The records move here when the package that owns them opens the store.
CREATE TABLE versions (
    desktop      TEXT    NOT NULL,
    n            INTEGER  NOT NULL CHECK (n > 0),
    kind         TEXT    NOT NULL CHECK (kind IN ('create', 'seal', 'check-in', 'conflict',
                                                  'rollback', 'recompose', 'squash', 'import')),
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
    CHECK ((checkin IS NULL) OR kind IN ('check-in', 'conflict'))
) WITHOUT ROWID;

-- +goose Down
DROP TABLE versions;
