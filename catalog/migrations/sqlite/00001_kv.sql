-- +goose Up
-- The catalog's records, one table of (bucket, key) -> value, ordered by key within
-- a bucket; and per-bucket sequences.
CREATE TABLE kv (
    b TEXT NOT NULL,
    k BLOB NOT NULL,
    v BLOB NOT NULL,
    PRIMARY KEY (b, k)
) WITHOUT ROWID;

CREATE TABLE seq (
    b TEXT PRIMARY KEY,
    n INTEGER NOT NULL
);

-- +goose Down
DROP TABLE seq;
DROP TABLE kv;
