-- +goose Up
-- A desktop's device group. A device reports its hardware class; each of its
-- bindings to a desktop has a policy (full: system and user disks; apps: the
-- desktop's apps and system versions recomposed onto the base variant of the
-- device's class; user: the user disk only) and what the device last said it
-- runs and has staged, and when. A base variant replaces a common base for one
-- hardware class (class_bases); the layers of desktops recomposed onto a
-- variant are remembered by the layer they were made from (class_layers), so
-- that each is made once, with the conflict count of the chain up to each
-- (-1 until counted). A version can be a device's snapshot, kept beside the
-- head when it becomes active. A device that asks for the active role while
-- another holds it is noted on the holder's lease (handover_to, handover_at):
-- the holder's agent syncs up and steps down, or the request times out.
ALTER TABLE devices ADD COLUMN class TEXT NOT NULL DEFAULT '';
ALTER TABLE device_desktops ADD COLUMN policy TEXT NOT NULL DEFAULT 'full' CHECK (policy IN ('full', 'apps', 'user'));
ALTER TABLE device_desktops ADD COLUMN runs INTEGER NOT NULL DEFAULT 0;
ALTER TABLE device_desktops ADD COLUMN staged INTEGER NOT NULL DEFAULT 0;
ALTER TABLE device_desktops ADD COLUMN fetched INTEGER NOT NULL DEFAULT 0;
ALTER TABLE device_desktops ADD COLUMN seen TIMESTAMP;
ALTER TABLE leases ADD COLUMN handover_to TEXT NOT NULL DEFAULT '';
ALTER TABLE leases ADD COLUMN handover_at TIMESTAMP;

CREATE TABLE class_bases (
    class   TEXT NOT NULL,
    base    TEXT NOT NULL,
    variant TEXT NOT NULL,
    created TIMESTAMP NOT NULL,
    PRIMARY KEY (class, base)
);

CREATE TABLE class_layers (
    variant   TEXT NOT NULL,
    layer     TEXT NOT NULL,
    rebased   TEXT NOT NULL,
    conflicts INTEGER NOT NULL DEFAULT -1,
    PRIMARY KEY (variant, layer)
);

-- SQLite cannot change a CHECK constraint: the versions table is rebuilt.
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

-- +goose Down
DELETE FROM versions WHERE kind = 'snapshot';
DROP TABLE class_layers;
DROP TABLE class_bases;
ALTER TABLE leases DROP COLUMN handover_at;
ALTER TABLE leases DROP COLUMN handover_to;
ALTER TABLE device_desktops DROP COLUMN seen;
ALTER TABLE device_desktops DROP COLUMN fetched;
ALTER TABLE device_desktops DROP COLUMN staged;
ALTER TABLE device_desktops DROP COLUMN runs;
ALTER TABLE device_desktops DROP COLUMN policy;
ALTER TABLE devices DROP COLUMN class;
