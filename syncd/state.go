package syncd

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	bolt "go.etcd.io/bbolt"
)

// Files of syncd inside a store directory. The images store does not look into
// SyncDir (its check covers layers/, clones/ and desktops/).
const (
	SyncDir     = "sync"
	StateFile   = "syncd.db"
	sessionsDir = "sessions" // server: check-ins being received
	fetchDir    = "fetch"    // laptop: layers being fetched
)

var (
	bucketMeta      = []byte("meta")
	bucketDevices   = []byte("devices")   // device id → Device
	bucketDevNames  = []byte("devnames")  // device name → device id
	bucketLeases    = []byte("leases")    // desktop → Lease (the active one)
	bucketLeaseLog  = []byte("leaselog")  // lease id → Lease with its end state
	bucketVersions  = []byte("versions")  // legacy: desktop → versions (moved into the catalog)
	bucketClusters  = []byte("clusters")  // digest (32 bytes) → layer id (32 bytes) + index (8 bytes)
	bucketIndexed   = []byte("indexed")   // layer id → number of clusters indexed
	bucketSessions  = []byte("sessions")  // check-in id → Session
	bucketCheckouts = []byte("checkouts") // laptop: desktop → Checkout

	allBuckets = [][]byte{bucketMeta, bucketDevices, bucketDevNames, bucketLeases, bucketLeaseLog,
		bucketVersions, bucketClusters, bucketIndexed, bucketSessions, bucketCheckouts}
)

const stateSchema = "1"

// state is syncd's own database in a store, <store>/sync/syncd.db: devices,
// leases, the cluster-digest index, check-in sessions, and on a laptop the
// checked-out desktops (the versions bucket only holds what an earlier syncd kept
// there, moved into the catalog at the server's start). Mode 0600: it holds
// device tokens on a laptop.
type state struct {
	dir string // <store>/sync
	db  *bolt.DB
}

func statePath(storeDir string) string { return filepath.Join(storeDir, SyncDir, StateFile) }

// openState opens (creating) the state database of the store in storeDir.
// errStateBusy: another process holds the sync state database.
var errStateBusy = errors.New("another cvd process holds it")

func openState(storeDir string, timeout time.Duration) (*state, error) {
	dir := filepath.Join(storeDir, SyncDir)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, noSpace(fmt.Errorf("create %s: %w", dir, err))
	}
	if timeout == 0 {
		timeout = 30 * time.Second
	}
	db, err := bolt.Open(filepath.Join(dir, StateFile), 0o600, &bolt.Options{Timeout: timeout})
	if err != nil {
		if errors.Is(err, bolt.ErrTimeout) {
			return nil, fmt.Errorf("open %s: %w (waited %v)", filepath.Join(dir, StateFile), errStateBusy, timeout)
		}
		return nil, noSpace(fmt.Errorf("open %s: %w", filepath.Join(dir, StateFile), err))
	}
	err = db.Update(func(tx *bolt.Tx) error {
		for _, b := range allBuckets {
			if _, err := tx.CreateBucketIfNotExists(b); err != nil {
				return err
			}
		}
		m := tx.Bucket(bucketMeta)
		if v := m.Get([]byte("schema")); v == nil {
			return m.Put([]byte("schema"), []byte(stateSchema))
		} else if string(v) != stateSchema {
			return fmt.Errorf("sync state schema %q is not supported (want %s)", v, stateSchema)
		}
		return nil
	})
	if err != nil {
		db.Close()
		return nil, noSpace(fmt.Errorf("open %s: %w", filepath.Join(dir, StateFile), err))
	}
	return &state{dir: dir, db: db}, nil
}

func (s *state) Close() error { return s.db.Close() }

func (s *state) view(fn func(tx *bolt.Tx) error) error { return s.db.View(fn) }

func (s *state) update(fn func(tx *bolt.Tx) error) error { return noSpace(s.db.Update(fn)) }

// getJSON decodes the value at key into v and reports whether it was there.
func getJSON(tx *bolt.Tx, bucket []byte, key string, v any) (bool, error) {
	raw := tx.Bucket(bucket).Get([]byte(key))
	if raw == nil {
		return false, nil
	}
	if err := json.Unmarshal(raw, v); err != nil {
		return true, fmt.Errorf("decode %s %q: %w", bucket, key, err)
	}
	return true, nil
}

func putJSON(tx *bolt.Tx, bucket []byte, key string, v any) error {
	raw, err := json.Marshal(v)
	if err != nil {
		return err
	}
	return tx.Bucket(bucket).Put([]byte(key), raw)
}
