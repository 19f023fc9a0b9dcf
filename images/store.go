package images

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"

	bolt "go.etcd.io/bbolt"
)

// Store directories and files, relative to the store directory.
const (
	DBFile      = "cvd.db"
	LayersDir   = "layers"
	ClonesDir   = "clones"
	DesktopsDir = "desktops"

	// TempPrefix starts the name of every file being written; recovery removes them.
	TempPrefix = ".tmp-"

	schemaVersion = "1"
)

var (
	bucketMeta     = []byte("meta")
	bucketLayers   = []byte("layers")
	bucketNames    = []byte("names")
	bucketRefs     = []byte("refs")
	bucketDesktops = []byte("desktops")
	bucketClones   = []byte("clones")
	bucketMACs     = []byte("macs")
	bucketPending  = []byte("pending")
	bucketDevices  = []byte("devices")
	bucketLeases   = []byte("leases")
	bucketClusters = []byte("clusters")

	allBuckets = [][]byte{bucketMeta, bucketLayers, bucketNames, bucketRefs, bucketDesktops,
		bucketClones, bucketMACs, bucketPending, bucketDevices, bucketLeases, bucketClusters}
)

// OpenOptions controls Open.
type OpenOptions struct {
	// ReadOnly opens the database shared and read-only: no change is allowed and
	// no recovery runs. The store must exist.
	ReadOnly bool
	// Timeout bounds the wait for another process that holds the store; 0 means 30 s.
	Timeout time.Duration
}

// Store is an open layer store. Its methods are safe for concurrent use by the
// goroutines of one process; a read-write Store excludes every other process.
type Store struct {
	dir       string
	db        *bolt.DB
	readOnly  bool
	recovered []string
	now       func() time.Time
}

// Open opens the store in dir, creating it unless opts.ReadOnly. A read-write open
// waits for other processes using the store, then recovers from an interrupted
// operation (see the package documentation); Recovered reports what it did.
func Open(dir string, opts OpenOptions) (*Store, error) {
	abs, err := filepath.Abs(dir)
	if err != nil {
		return nil, fmt.Errorf("store %s: %w", dir, err)
	}
	if ev, err := filepath.EvalSymlinks(abs); err == nil {
		abs = ev
	}
	s := &Store{dir: abs, readOnly: opts.ReadOnly, now: time.Now}
	if !opts.ReadOnly {
		for _, d := range []string{"", LayersDir, ClonesDir, DesktopsDir} {
			if err := os.MkdirAll(filepath.Join(abs, d), 0o755); err != nil {
				return nil, fmt.Errorf("create store: %w", err)
			}
		}
	} else if _, err := os.Stat(filepath.Join(abs, DBFile)); err != nil {
		return nil, fmt.Errorf("open store %s: %w", abs, err)
	}
	timeout := opts.Timeout
	if timeout == 0 {
		timeout = 30 * time.Second
	}
	db, err := bolt.Open(filepath.Join(abs, DBFile), 0o644, &bolt.Options{Timeout: timeout, ReadOnly: opts.ReadOnly})
	if err != nil {
		if errors.Is(err, bolt.ErrTimeout) {
			return nil, fmt.Errorf("open store %s: another process holds it (waited %v)", abs, timeout)
		}
		return nil, fmt.Errorf("open store database %s: %w", filepath.Join(abs, DBFile), err)
	}
	s.db = db
	if opts.ReadOnly {
		err = db.View(func(tx *bolt.Tx) error {
			if tx.Bucket(bucketMeta) == nil {
				return fmt.Errorf("%s is not a cvd store database", filepath.Join(abs, DBFile))
			}
			return checkSchema(tx)
		})
	} else {
		err = db.Update(func(tx *bolt.Tx) error {
			for _, b := range allBuckets {
				if _, err := tx.CreateBucketIfNotExists(b); err != nil {
					return err
				}
			}
			m := tx.Bucket(bucketMeta)
			if m.Get([]byte("schema")) == nil {
				return m.Put([]byte("schema"), []byte(schemaVersion))
			}
			return checkSchema(tx)
		})
		if err == nil {
			err = s.recover()
		}
	}
	if err != nil {
		db.Close()
		return nil, err
	}
	return s, nil
}

func checkSchema(tx *bolt.Tx) error {
	v := tx.Bucket(bucketMeta).Get([]byte("schema"))
	if string(v) != schemaVersion {
		return fmt.Errorf("store schema %q is not supported (want %s)", v, schemaVersion)
	}
	return nil
}

// Close closes the database.
func (s *Store) Close() error { return s.db.Close() }

// Dir is the store's absolute directory.
func (s *Store) Dir() string { return s.dir }

// Path turns a store-relative path (as records hold them) into an absolute one.
func (s *Store) Path(rel string) string { return filepath.Join(s.dir, filepath.FromSlash(rel)) }

// LayerPath is the absolute path of layer id's file.
func (s *Store) LayerPath(id string) string { return s.Path(layerRel(id)) }

func layerRel(id string) string { return LayersDir + "/" + id + ".qcow2" }

// Recovered lists what Open did to recover from an interrupted operation.
func (s *Store) Recovered() []string { return s.recovered }

func (s *Store) writable() error {
	if s.readOnly {
		return ErrReadOnlyStore
	}
	return nil
}

// pendingEntry is the journal record of one operation that makes or removes files.
type pendingEntry struct {
	Op      string    `json:"op"`
	Files   []string  `json:"files"` // store-relative
	Started time.Time `json:"started"`
	PID     int       `json:"pid"`
}

// Pending is an operation whose files are journaled: until it is committed, a crash
// or Abort removes them. Package clone uses it to write clone files.
type Pending struct {
	s     *Store
	key   []byte
	files []string
	done  bool
}

// Begin journals the store-relative files that an operation is about to create,
// in a transaction of its own.
func (s *Store) Begin(op string, files []string) (*Pending, error) {
	if err := s.writable(); err != nil {
		return nil, err
	}
	p := &Pending{s: s, files: files}
	err := s.db.Update(func(tx *bolt.Tx) error {
		var err error
		p.key, err = putPending(tx, op, files, true, s.now())
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("journal %s: %w", op, err)
	}
	return p, nil
}

// putPending journals files; create says they are about to be made (so they must
// not exist), else removed.
func putPending(tx *bolt.Tx, op string, files []string, create bool, now time.Time) ([]byte, error) {
	b := tx.Bucket(bucketPending)
	// Files to make must not exist: an Abort would remove someone else's.
	if create {
		dir := filepath.Dir(tx.DB().Path())
		for _, f := range files {
			if _, err := os.Lstat(filepath.Join(dir, filepath.FromSlash(f))); err == nil {
				return nil, fmt.Errorf("%w: %s", ErrExists, f)
			}
		}
	}
	// The journal also reserves the files: two operations of one process must not
	// write (or, aborting, remove) the same file.
	if k, _ := b.Cursor().First(); k != nil {
		want := make(map[string]bool, len(files))
		for _, f := range files {
			want[f] = true
		}
		err := b.ForEach(func(k, v []byte) error {
			var e pendingEntry
			if err := json.Unmarshal(v, &e); err != nil {
				return err
			}
			for _, f := range e.Files {
				if want[f] {
					return fmt.Errorf("%w: %s is being written by another %s", ErrExists, f, e.Op)
				}
			}
			return nil
		})
		if err != nil {
			return nil, err
		}
	}
	seq, err := b.NextSequence()
	if err != nil {
		return nil, err
	}
	key := binary.BigEndian.AppendUint64(nil, seq)
	v, err := json.Marshal(pendingEntry{Op: op, Files: files, Started: now.UTC(), PID: os.Getpid()})
	if err != nil {
		return nil, err
	}
	return key, b.Put(key, v)
}

// Abort removes the journaled files and drops the journal entry.
func (p *Pending) Abort() error {
	if p.done {
		return nil
	}
	p.done = true
	err := p.s.removeFiles(p.files)
	if err2 := p.s.db.Update(func(tx *bolt.Tx) error { return tx.Bucket(bucketPending).Delete(p.key) }); err == nil {
		err = err2
	}
	return err
}

// commit runs fn in the transaction that drops the journal entry.
func (p *Pending) commit(fn func(tx *bolt.Tx) error) error {
	if p.done {
		return errors.New("operation already finished")
	}
	err := p.s.db.Update(func(tx *bolt.Tx) error {
		if err := fn(tx); err != nil {
			return err
		}
		return tx.Bucket(bucketPending).Delete(p.key)
	})
	if err == nil {
		p.done = true
	}
	return err
}

// removeFiles unlinks store-relative files (missing ones are fine) and syncs their
// directories.
func (s *Store) removeFiles(files []string) error {
	var first error
	dirs := map[string]bool{}
	for _, f := range files {
		p := s.Path(f)
		if err := os.Remove(p); err != nil && !errors.Is(err, os.ErrNotExist) && first == nil {
			first = err
		}
		dirs[filepath.Dir(p)] = true
	}
	for d := range dirs {
		if err := syncDir(d); err != nil && first == nil {
			first = err
		}
	}
	return first
}

// removeJournaled removes files whose records tx deletes: the files are journaled
// in the same transaction, unlinked after it commits, and the entry dropped last.
func (s *Store) removeJournaled(op string, fn func(tx *bolt.Tx) ([]string, error)) error {
	if err := s.writable(); err != nil {
		return err
	}
	var key []byte
	var files []string
	err := s.db.Update(func(tx *bolt.Tx) error {
		var err error
		files, err = fn(tx)
		if err != nil {
			return err
		}
		if len(files) == 0 {
			return nil
		}
		key, err = putPending(tx, op, files, false, s.now())
		return err
	})
	if err != nil || key == nil {
		return err
	}
	if err := s.removeFiles(files); err != nil {
		return fmt.Errorf("%s: remove files: %w (the store's next open retries)", op, err)
	}
	return s.db.Update(func(tx *bolt.Tx) error { return tx.Bucket(bucketPending).Delete(key) })
}

// recover undoes (or completes) interrupted operations: see the package doc.
func (s *Store) recover() error {
	type ent struct {
		key []byte
		e   pendingEntry
	}
	var ents []ent
	err := s.db.View(func(tx *bolt.Tx) error {
		return tx.Bucket(bucketPending).ForEach(func(k, v []byte) error {
			var e pendingEntry
			if err := json.Unmarshal(v, &e); err != nil {
				return fmt.Errorf("pending entry %x: %w", k, err)
			}
			ents = append(ents, ent{append([]byte(nil), k...), e})
			return nil
		})
	})
	if err != nil {
		return fmt.Errorf("recover: %w", err)
	}
	for _, en := range ents {
		var n int
		for _, f := range en.e.Files {
			if _, err := os.Lstat(s.Path(f)); err == nil {
				n++
			}
		}
		if err := s.removeFiles(en.e.Files); err != nil {
			return fmt.Errorf("recover interrupted %s: %w", en.e.Op, err)
		}
		if err := s.db.Update(func(tx *bolt.Tx) error { return tx.Bucket(bucketPending).Delete(en.key) }); err != nil {
			return fmt.Errorf("recover: %w", err)
		}
		s.recovered = append(s.recovered, fmt.Sprintf("finished interrupted %s (pid %d, %s): removed %d of its %d files",
			en.e.Op, en.e.PID, en.e.Started.Format(time.RFC3339), n, len(en.e.Files)))
	}
	temps, err := s.tempFiles()
	if err != nil {
		return fmt.Errorf("recover: %w", err)
	}
	if len(temps) > 0 {
		// Temporary entries may be directories (seed image work areas).
		for _, t := range temps {
			if err := os.RemoveAll(s.Path(t)); err != nil {
				return fmt.Errorf("recover: %w", err)
			}
		}
		s.recovered = append(s.recovered, fmt.Sprintf("removed %d temporary files of interrupted operations", len(temps)))
	}
	return nil
}

// tempFiles lists the store-relative ".tmp-*" files in the store's directories.
func (s *Store) tempFiles() ([]string, error) {
	var out []string
	for _, d := range []string{"", LayersDir, ClonesDir, DesktopsDir} {
		ents, err := os.ReadDir(s.Path(d))
		if err != nil {
			if errors.Is(err, os.ErrNotExist) {
				continue
			}
			return nil, err
		}
		for _, e := range ents {
			if strings.HasPrefix(e.Name(), TempPrefix) {
				out = append(out, pathJoin(d, e.Name()))
			}
		}
	}
	return out, nil
}

func pathJoin(dir, name string) string {
	if dir == "" {
		return name
	}
	return dir + "/" + name
}

func syncDir(dir string) error {
	f, err := os.Open(dir)
	if err != nil {
		return err
	}
	err = f.Sync()
	if err2 := f.Close(); err == nil {
		err = err2
	}
	return err
}

// getJSON decodes the value at key of bucket b into v; it reports false when absent.
func getJSON(b *bolt.Bucket, key string, v any) (bool, error) {
	raw := b.Get([]byte(key))
	if raw == nil {
		return false, nil
	}
	if err := json.Unmarshal(raw, v); err != nil {
		return true, fmt.Errorf("decode %s %q: %w", b.Tx().DB().Path(), key, err)
	}
	return true, nil
}

func putJSON(b *bolt.Bucket, key string, v any) error {
	raw, err := json.Marshal(v)
	if err != nil {
		return err
	}
	return b.Put([]byte(key), raw)
}

// refKey is the refs key "<id> 0 <kind> 0 <name>".
func refKey(id, kind, name string) []byte {
	return []byte(id + "\x00" + kind + "\x00" + name)
}

// directRefs lists what stands directly on layer id.
func directRefs(tx *bolt.Tx, id string) []Dependent {
	var out []Dependent
	prefix := []byte(id + "\x00")
	c := tx.Bucket(bucketRefs).Cursor()
	for k, _ := c.Seek(prefix); k != nil && strings.HasPrefix(string(k), string(prefix)); k, _ = c.Next() {
		parts := strings.SplitN(string(k[len(prefix):]), "\x00", 2)
		if len(parts) == 2 {
			out = append(out, Dependent{Kind: parts[0], Name: parts[1]})
		}
	}
	return out
}

// allDependents lists everything standing on layer id, directly or through child
// layers, breadth first.
func allDependents(tx *bolt.Tx, id string) []Dependent {
	var out []Dependent
	seen := map[Dependent]bool{}
	queue := []string{id}
	for len(queue) > 0 {
		cur := queue[0]
		queue = queue[1:]
		for _, d := range directRefs(tx, cur) {
			if seen[d] {
				continue
			}
			seen[d] = true
			out = append(out, d)
			if d.Kind == "layer" {
				queue = append(queue, d.Name)
			}
		}
	}
	// Layers first, then desktops, then clones (there may be thousands).
	rank := map[string]int{"layer": 0, "desktop": 1, "clone": 2}
	sort.SliceStable(out, func(i, j int) bool { return rank[out[i].Kind] < rank[out[j].Kind] })
	return out
}
