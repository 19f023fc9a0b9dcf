-- +goose Up
-- A device is a laptop (it checks its desktops out under a lease) or a
-- hypervisor host of the site (it pulls the sealed layers of any desktop by ID,
-- without a lease, and provisions clones on its own store).
ALTER TABLE devices ADD COLUMN kind TEXT NOT NULL DEFAULT 'laptop' CHECK (kind IN ('laptop', 'host'));

-- +goose Down
ALTER TABLE devices DROP COLUMN kind;
