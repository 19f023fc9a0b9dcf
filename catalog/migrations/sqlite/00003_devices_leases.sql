-- +goose Up
-- The devices a server knows (of a token, only its SHA-256), the desktops each
-- is bound to, and the leases: one row per lease ever granted, the active one
-- of a desktop (at most one, the partial unique index says so) and those that
-- ended. A lease's epoch numbers the leases of its desktop (1, 2, ...): it is
-- the fencing token, and a holder whose epoch is not the active lease's is
-- refused. Until now these were JSON records; they move here when the store
-- opens.
CREATE TABLE devices (
    id           TEXT PRIMARY KEY,
    name         TEXT NOT NULL UNIQUE,
    token_sha256 TEXT NOT NULL CHECK (length(token_sha256) = 64),
    created      TIMESTAMP NOT NULL
);

CREATE TABLE device_desktops (
    device  TEXT NOT NULL REFERENCES devices (id) ON DELETE CASCADE,
    desktop TEXT NOT NULL,
    PRIMARY KEY (device, desktop)
);
CREATE INDEX device_desktops_desktop ON device_desktops (desktop);

CREATE TABLE leases (
    id          TEXT PRIMARY KEY,
    desktop     TEXT NOT NULL,
    epoch       INTEGER NOT NULL CHECK (epoch > 0),
    device      TEXT NOT NULL,
    device_name TEXT NOT NULL,
    granted     TIMESTAMP NOT NULL,
    expires     TIMESTAMP NOT NULL,
    version     INTEGER NOT NULL,
    state       TEXT NOT NULL CHECK (state IN ('active', 'released', 'broken', 'expired')),
    ended       TIMESTAMP,
    UNIQUE (desktop, epoch)
);
CREATE UNIQUE INDEX leases_active ON leases (desktop) WHERE state = 'active';

-- +goose Down
DROP TABLE leases;
DROP TABLE device_desktops;
DROP TABLE devices;
