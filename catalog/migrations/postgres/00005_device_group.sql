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
ALTER TABLE device_desktops ADD COLUMN runs BIGINT NOT NULL DEFAULT 0;
ALTER TABLE device_desktops ADD COLUMN staged BIGINT NOT NULL DEFAULT 0;
ALTER TABLE device_desktops ADD COLUMN fetched BIGINT NOT NULL DEFAULT 0;
ALTER TABLE device_desktops ADD COLUMN seen TIMESTAMPTZ;
ALTER TABLE leases ADD COLUMN handover_to TEXT NOT NULL DEFAULT '';
ALTER TABLE leases ADD COLUMN handover_at TIMESTAMPTZ;

CREATE TABLE class_bases (
    class   TEXT NOT NULL,
    base    TEXT NOT NULL,
    variant TEXT NOT NULL,
    created TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (class, base)
);

CREATE TABLE class_layers (
    variant   TEXT NOT NULL,
    layer     TEXT NOT NULL,
    rebased   TEXT NOT NULL,
    conflicts BIGINT NOT NULL DEFAULT -1,
    PRIMARY KEY (variant, layer)
);

ALTER TABLE versions DROP CONSTRAINT versions_kind_check;
ALTER TABLE versions ADD CONSTRAINT versions_kind_check CHECK (kind IN ('create', 'seal', 'check-in', 'conflict',
    'rollback', 'recompose', 'squash', 'import', 'snapshot'));
ALTER TABLE versions DROP CONSTRAINT versions_check;
ALTER TABLE versions ADD CONSTRAINT versions_check CHECK ((checkin IS NULL) OR kind IN ('check-in', 'conflict', 'snapshot'));

-- +goose Down
DELETE FROM versions WHERE kind = 'snapshot';
ALTER TABLE versions DROP CONSTRAINT versions_check;
ALTER TABLE versions ADD CONSTRAINT versions_check CHECK ((checkin IS NULL) OR kind IN ('check-in', 'conflict'));
ALTER TABLE versions DROP CONSTRAINT versions_kind_check;
ALTER TABLE versions ADD CONSTRAINT versions_kind_check CHECK (kind IN ('create', 'seal', 'check-in', 'conflict',
    'rollback', 'recompose', 'squash', 'import'));
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
