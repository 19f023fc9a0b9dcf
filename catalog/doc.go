// Package catalog is the SQL database that holds a store's durable state, shared
// by every process that uses the store: the embedded default, SQLite in one file
// of the store (WAL mode, through the pure-Go modernc.org/sqlite), or a PostgreSQL
// database (through pgx) for a site whose servers share one catalog.
//
// # Words
//
//   - Engine: "sqlite" or "postgres", chosen by the catalog's URL: a file path (or
//     "sqlite:PATH") is SQLite, "postgres://…" or "postgresql://…" is PostgreSQL.
//   - Bucket: a named, key-ordered set of records (key → value, both bytes). Keys
//     compare as bytes in both engines, so a prefix scan is a range scan. Records
//     are JSON documents or small binary values chosen by the packages above.
//   - Sequence: a per-bucket counter that only grows ([Bucket.NextSequence]).
//   - Transaction: [DB.View] reads a consistent snapshot and never waits for a
//     writer (SQLite WAL; PostgreSQL REPEATABLE READ). [DB.Update] is the only way
//     to write: writers are serialized across every process of the store (SQLite's
//     write lock, taken at BEGIN IMMEDIATE; a PostgreSQL transaction-scoped
//     advisory lock), wait at most [Options.WriteWait] for one another, and give
//     up at once when their context is cancelled (Ctrl-C). Keep them short: no
//     network I/O and no big file writes inside a transaction.
//   - Migration: the schema is a sequence of versioned SQL files per engine,
//     embedded in the binary and applied on open by goose.
//
// # Schema (version 1)
//
//	kv  (b TEXT, k BLOB/BYTEA, v BLOB/BYTEA, PRIMARY KEY (b, k))   the records
//	seq (b TEXT PRIMARY KEY, n BIGINT)                                the sequences
//	goose_db_version                                                  applied migrations
package catalog
