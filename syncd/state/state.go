package state

import (
	"encoding/json"
	"fmt"
	"os"

	"github.com/cvd-project/cvd/catalog"
	"github.com/cvd-project/cvd/images"
	"github.com/cvd-project/cvd/syncd/proto"
)

// Directories of syncd inside a store directory. The images store does not look
// into SyncDir (its check covers layers/, clones/ and desktops/).
const (
	SyncDir     = "sync"
	SessionsDir = "sessions" // server: check-ins being received
	FetchDir    = "fetch"    // laptop: layers being fetched
	EntriesDir  = "entries"  // server: each layer's entry list, made once
	StreamDir   = "stream"   // laptop: streamed desktops (tops on NBD, partial layers, sockets)
)

// syncd's buckets in the store's catalog (see package catalog); the names carry
// the prefix a migrated bbolt syncd.db's buckets get.
var (
	BucketVersions  = []byte(images.LegacySyncPrefix + "versions")  // legacy: desktop → versions (moved into the desktops' records)
	BucketClusters  = []byte(images.LegacySyncPrefix + "clusters")  // digest (32 bytes) → layer id (32 bytes) + index (8 bytes)
	BucketIndexed   = []byte(images.LegacySyncPrefix + "indexed")   // layer id → number of clusters indexed
	BucketSessions  = []byte(images.LegacySyncPrefix + "sessions")  // check-in id → Session
	BucketCheckouts = []byte(images.LegacySyncPrefix + "checkouts") // laptop: desktop → Checkout
	BucketHaves     = []byte(images.LegacySyncPrefix + "haves")     // server: lease → the layers its check-out said the laptop holds
	BucketRemote    = []byte(images.LegacySyncPrefix + "remote")    // server: desktop → proto.RemoteOpen (a device asked to run it)
	BucketWorking   = []byte(images.LegacySyncPrefix + "working")   // server: layer → proto.WorkingSet (clusters read at boot, merged across devices)
	BucketKeys      = []byte(images.LegacySyncPrefix + "keys")      // server: device/desktop → the escrowed key of an encrypted copy
	BucketWipes     = []byte(images.LegacySyncPrefix + "wipes")     // server: device id → when a wipe was ordered
)

// State is syncd's part of the store: its records in the store's catalog
// (devices, leases, the cluster-digest index, check-in sessions, and on a laptop
// the checked-out desktops with their tokens) and its directory <store>/sync
// (mode 0700) for check-ins being received and layers being fetched.
type State struct {
	Dir string // <store>/sync
	DB  *catalog.DB
}

// Open opens syncd's part of an open store.
func Open(store *images.Store) (*State, error) {
	dir := store.Path(SyncDir)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, proto.NoSpace(fmt.Errorf("create %s: %w", dir, err))
	}
	return &State{Dir: dir, DB: store.Catalog()}, nil
}

// Close releases nothing: the catalog is the store's.
func (s *State) Close() error { return nil }

func (s *State) View(fn func(tx *catalog.Tx) error) error { return s.DB.View(fn) }

func (s *State) Update(fn func(tx *catalog.Tx) error) error { return proto.NoSpace(s.DB.Update(fn)) }

// GetJSON decodes the value at key into v and reports whether it was there.
func GetJSON(tx *catalog.Tx, bucket []byte, key string, v any) (bool, error) {
	raw := tx.Bucket(bucket).Get([]byte(key))
	if raw == nil {
		return false, nil
	}
	if err := json.Unmarshal(raw, v); err != nil {
		return true, fmt.Errorf("decode %s %q: %w", bucket, key, err)
	}
	return true, nil
}

func PutJSON(tx *catalog.Tx, bucket []byte, key string, v any) error {
	raw, err := json.Marshal(v)
	if err != nil {
		return err
	}
	return tx.Bucket(bucket).Put([]byte(key), raw)
}
