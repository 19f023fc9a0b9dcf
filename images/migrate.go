package images

import (
	"errors"
	"fmt"
	"os"
	"time"

	"github.com/cvd-project/cvd/catalog"
	"github.com/cvd-project/cvd/internal/fsutil"
	bolt "go.etcd.io/bbolt"
)

// The files of a store written by the bbolt releases: the store's database and
// syncd's. Their records move into the catalog at the first read-write open; a
// file is renamed to "<name>.migrated" only after the catalog's transaction
// committed, so a crash in between repeats the migration from the old files.
const (
	LegacyDBFile   = "cvd.db"
	LegacySyncFile = "sync/syncd.db"
	// LegacySyncPrefix is prepended to the names of syncd's buckets.
	LegacySyncPrefix = "sync."
	migratedSuffix   = ".migrated"
)

var keyMigrated = []byte("migrated-from-bbolt")

// migrateBolt moves the records of a bbolt store into the catalog, bucket by
// bucket with their sequences, in one transaction.
func (s *Store) migrateBolt() error {
	files := []struct{ rel, prefix string }{{LegacyDBFile, ""}, {LegacySyncFile, LegacySyncPrefix}}
	var present []string
	for _, f := range files {
		if _, err := os.Stat(s.Path(f.rel)); err == nil {
			present = append(present, f.rel)
		}
	}
	if len(present) == 0 {
		return nil
	}
	var done bool
	if err := s.db.View(func(tx *catalog.Tx) error {
		done = tx.Bucket(bucketMeta).Get(keyMigrated) != nil
		return nil
	}); err != nil {
		return err
	}
	if !done {
		dbs := map[string]*bolt.DB{}
		defer func() {
			for _, db := range dbs {
				db.Close()
			}
		}()
		for _, rel := range present {
			db, err := bolt.Open(s.Path(rel), 0o600, &bolt.Options{Timeout: 2 * time.Second, ReadOnly: true})
			if err != nil {
				if errors.Is(err, bolt.ErrTimeout) {
					return fmt.Errorf("migrate %s: a process of an earlier cvd release holds it: stop it first", s.Path(rel))
				}
				return fmt.Errorf("migrate %s: %w", s.Path(rel), err)
			}
			dbs[rel] = db
		}
		err := s.db.Update(func(ctx *catalog.Tx) error {
			if ctx.Bucket(bucketMeta).Get(keyMigrated) != nil {
				return nil // another process did it meanwhile
			}
			for _, f := range files {
				db := dbs[f.rel]
				if db == nil {
					continue
				}
				err := db.View(func(btx *bolt.Tx) error {
					return btx.ForEach(func(name []byte, b *bolt.Bucket) error {
						dst := ctx.Bucket([]byte(f.prefix + string(name)))
						if seq := b.Sequence(); seq > 0 {
							if err := dst.SetSequence(seq); err != nil {
								return err
							}
						}
						return b.ForEach(func(k, v []byte) error {
							if v == nil {
								return nil // a nested bucket: none were written
							}
							return dst.Put(k, v)
						})
					})
				})
				if err != nil {
					return fmt.Errorf("migrate %s: %w", s.Path(f.rel), err)
				}
			}
			if err := s.moveRecords(ctx); err != nil {
				return fmt.Errorf("migrate: %w", err)
			}
			return ctx.Bucket(bucketMeta).Put(keyMigrated, []byte(s.now().UTC().Format(time.RFC3339)))
		})
		if err != nil {
			return err
		}
		s.recovered = append(s.recovered, fmt.Sprintf("moved the records of %v into the catalog", present))
	}
	for _, rel := range present {
		if err := os.Rename(s.Path(rel), s.Path(rel)+migratedSuffix); err != nil && !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("migrate: keep %s: %w", rel, err)
		}
	}
	return fsutil.Sync(s.dir)
}

// A RecordMover moves the records that an earlier layout of the catalog kept as
// JSON documents (in a bbolt store, or in the catalog's first schema) into the
// typed tables of the current one, in the transaction it is given, and reports
// how many it moved. It must be idempotent. The package that owns such records
// registers its mover from init; Open runs every mover in the transaction that
// migrates a bbolt store, and after it applied a schema migration.
type RecordMover func(tx *catalog.Tx) (int, error)

type namedMover struct {
	what string
	fn   RecordMover
}

var movers = []namedMover{{"versions listed in desktop records", moveVersions}}

// RegisterRecordMover adds a mover (call it from init); what names the records.
func RegisterRecordMover(what string, fn RecordMover) {
	movers = append(movers, namedMover{what, fn})
}

// moveRecords runs every mover in tx.
func (s *Store) moveRecords(tx *catalog.Tx) error {
	for _, m := range movers {
		n, err := m.fn(tx)
		if err != nil {
			return fmt.Errorf("move %s: %w", m.what, err)
		}
		if n > 0 {
			s.recovered = append(s.recovered, fmt.Sprintf("%s: %d records moved into typed tables", m.what, n))
		}
	}
	return nil
}
