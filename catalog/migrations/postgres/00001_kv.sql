-- +goose Up
-- The catalog's records, one table of (bucket, key) -> value, ordered by key within
-- a bucket; and per-bucket sequences.
CREATE TABLE kv (
    b TEXT NOT NULL,
    k BYTEA NOT NULL,
    v BYTEA NOT NULL,
    PRIMARY KEY (b, k)
);

CREATE TABLE seq (
    b TEXT PRIMARY KEY,
    n BIGINT NOT NULL
);

-- +goose Down
DROP TABLE seq;
DROP TABLE kv;
