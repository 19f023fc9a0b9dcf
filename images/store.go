package images

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/cvd-project/cvd/disk"

	"github.com/cvd-project/cvd/catalog"
	"github.com/cvd-project/cvd/internal/fsutil"
	"github.com/cvd-project/cvd/internal/proc"
)

// Store directories and files, relative to the store directory.
const (
	// CatalogFile is the embedded catalog (SQLite) of a store that names no other.
	CatalogFile = "catalog.db"
	// ConfigFile remembers the store's catalog when it is not the embedded one.
	ConfigFile  = "config.json"
	LayersDir   = "layers"
	ClonesDir   = "clones"
	DesktopsDir = "desktops"

	// TempPrefix starts the name of every file being written; recovery removes
	// those of processes that are gone.
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
)

// OpenOptions controls Open.
type OpenOptions struct {
	// ReadOnly opens the store for reading: no change is allowed and no recovery
	// runs. The store must exist.
	ReadOnly bool
	// Catalog is the catalog's URL (a file path or postgres://…). Empty means the
	// one the store's config file names, else the embedded catalog.db. A store
	// remembers the catalog it was created with; naming another is refused.
	Catalog string
	// Timeout bounds a write's wait for writers of other processes; 0 means 30 s.
	Timeout time.Duration
	// Context cancels waits for other writers (Ctrl-C); nil is Background.
	Context context.Context
}

// Store is an open layer store. Its methods are safe for concurrent use, by the
// goroutines of one process and by other processes that open the same store:
// every change is a catalog transaction.
type Store struct {
	dir       string
	db        *catalog.DB
	readOnly  bool
	recovered []string
	now       func() time.Time

	// done are journal entries whose work is finished (their files removed):
	// they are deleted in the store's next journal transaction or at Close, not
	// in a transaction of their own. A crash leaves them to recovery, which
	// finds nothing left to do.
	mu   sync.Mutex
	done [][]byte

	// topEncryption says how a new top at a store-relative path is encrypted
	// (SetTopEncryption); nil makes plain tops.
	topEncryption func(rel string) (*disk.Encryption, error)
}

// SetTopEncryption makes every writable top the store creates from now on (a
// desktop's first tops, a reset after a check-in) encrypted as fn says for its
// store-relative path; fn returns nil for a plain top, and an error when the
// top must be encrypted and cannot be (no top is made then: never a plain one
// by mistake). A laptop with encrypted copies sets it; its keys open the
// layers through disk.AddKeyring.
func (s *Store) SetTopEncryption(fn func(rel string) (*disk.Encryption, error)) {
	s.mu.Lock()
	s.topEncryption = fn
	s.mu.Unlock()
}

// TopEncryption is how a new top at rel is encrypted (nil: plain).
func (s *Store) TopEncryption(rel string) (*disk.Encryption, error) {
	s.mu.Lock()
	fn := s.topEncryption
	s.mu.Unlock()
	if fn == nil {
		return nil, nil
	}
	return fn(rel)
}

// storeConfig is the store's config file: the store's ID (also recorded in its
// catalog, so that two stores never share one PostgreSQL database by mistake)
// and its catalog when that is not the embedded one.
type storeConfig struct {
	ID      string `json:"id"`
	Catalog string `json:"catalog,omitempty"`
}

func readConfig(dir string) (storeConfig, error) {
	var cfg storeConfig
	b, err := os.ReadFile(filepath.Join(dir, ConfigFile))
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return cfg, nil
		}
		return cfg, err
	}
	if err := json.Unmarshal(b, &cfg); err != nil {
		return cfg, fmt.Errorf("%s: %w", filepath.Join(dir, ConfigFile), err)
	}
	return cfg, nil
}

// catalogURL chooses the store's catalog (see OpenOptions.Catalog).
func catalogURL(dir string, cfg storeConfig, want string) (string, error) {
	have := cfg.Catalog
	if have == "" && (want == "" || cfg.ID != "") {
		have = filepath.Join(dir, CatalogFile)
	}
	if want == "" || want == have {
		return have, nil
	}
	if have != "" {
		return "", fmt.Errorf("%w: the store's catalog is %s, not %s", ErrInvalid, redact(have), redact(want))
	}
	if _, _, err := catalog.EngineOf(want); err != nil {
		return "", fmt.Errorf("%w: %v", ErrInvalid, err)
	}
	return want, nil
}

func redact(u string) string {
	if pu, err := url.Parse(u); err == nil && pu.User != nil {
		return pu.Redacted()
	}
	return u
}

// Open opens the store in dir, creating it unless opts.ReadOnly. A read-write
// open recovers from operations that processes now gone left unfinished (see the
// package documentation), and moves a store of the earlier bbolt format into the
// catalog; Recovered reports what it did.
func Open(dir string, opts OpenOptions) (*Store, error) {
	abs, err := filepath.Abs(dir)
	if err != nil {
		return nil, fmt.Errorf("store %s: %w", dir, err)
	}
	if ev, err := filepath.EvalSymlinks(abs); err == nil {
		abs = ev
	}
	s := &Store{dir: abs, readOnly: opts.ReadOnly, now: time.Now}
	if opts.ReadOnly {
		if _, err := os.Stat(abs); err != nil {
			return nil, fmt.Errorf("open store %s: %w", abs, err)
		}
	} else {
		for _, d := range []string{"", LayersDir, ClonesDir, DesktopsDir} {
			if err := os.MkdirAll(filepath.Join(abs, d), 0o755); err != nil {
				return nil, fmt.Errorf("create store: %w", err)
			}
		}
	}
	cfg, err := readConfig(abs)
	if err != nil {
		return nil, fmt.Errorf("open store %s: %w", abs, err)
	}
	u, err := catalogURL(abs, cfg, opts.Catalog)
	if err != nil {
		return nil, fmt.Errorf("open store %s: %w", abs, err)
	}
	db, err := catalog.Open(u, catalog.Options{ReadOnly: opts.ReadOnly, WriteWait: opts.Timeout, Context: opts.Context})
	if err != nil {
		if errors.Is(err, catalog.ErrNotExist) {
			return nil, fmt.Errorf("open store %s: %w (not a cvd store)", abs, err)
		}
		return nil, fmt.Errorf("open store %s: %w", abs, err)
	}
	s.db = db
	if opts.ReadOnly {
		err = db.View(func(tx *catalog.Tx) error { return checkSchema(tx, cfg.ID) })
	} else {
		err = s.migrateBolt()
		if err == nil && len(db.Applied()) > 0 {
			err = s.db.Update(s.moveRecords)
		}
		if err == nil {
			err = s.initCatalog(cfg, u)
		}
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

var keySchema, keyStoreID = []byte("schema"), []byte("store-id")

// checkSchema checks that the catalog holds this store's records in the layout
// this binary knows.
func checkSchema(tx *catalog.Tx, id string) error {
	m := tx.Bucket(bucketMeta)
	v := m.Get(keySchema)
	if v == nil {
		return fmt.Errorf("the catalog holds no cvd store (no schema record)")
	}
	if string(v) != schemaVersion {
		return fmt.Errorf("store schema %q is not supported (want %s)", v, schemaVersion)
	}
	if have := m.Get(keyStoreID); have != nil && id != "" && string(have) != id {
		return fmt.Errorf("%w: the catalog belongs to store %s, this store is %s", ErrInvalid, have, id)
	}
	return nil
}

// initCatalog gives a new store its ID and schema record, and its config file.
func (s *Store) initCatalog(cfg storeConfig, u string) error {
	// Every open but a store's first finds both records, in one read: no write.
	old := cfg
	done := false
	err := s.db.View(func(tx *catalog.Tx) error {
		m := tx.Bucket(bucketMeta)
		have := m.Get(keyStoreID)
		if m.Get(keySchema) == nil || have == nil ||
			!(cfg.ID == string(have) || (cfg.ID == "" && s.db.Engine() == catalog.SQLite)) {
			return nil
		}
		cfg.ID, done = string(have), true
		return checkSchema(tx, cfg.ID)
	})
	if err == nil && !done {
		err = s.updateMeta(&cfg)
	}
	if err != nil {
		return err
	}
	want := storeConfig{ID: cfg.ID}
	if u != filepath.Join(s.dir, CatalogFile) {
		want.Catalog = u
	}
	if old != want {
		if err := writeFileSync(filepath.Join(s.dir, ConfigFile), want); err != nil {
			return fmt.Errorf("write %s: %w", ConfigFile, err)
		}
	}
	return nil
}

// updateMeta writes the schema and store-ID records a catalog lacks.
func (s *Store) updateMeta(cfg *storeConfig) error {
	if cfg.ID == "" {
		cfg.ID = randHex(16)
	}
	return s.db.Update(func(tx *catalog.Tx) error {
		m := tx.Bucket(bucketMeta)
		if m.Get(keySchema) == nil {
			if err := m.Put(keySchema, []byte(schemaVersion)); err != nil {
				return err
			}
		}
		if have := m.Get(keyStoreID); have == nil {
			if err := m.Put(keyStoreID, []byte(cfg.ID)); err != nil {
				return err
			}
		} else if s.db.Engine() == catalog.SQLite {
			cfg.ID = string(have) // the embedded catalog is the store's own
		}
		return checkSchema(tx, cfg.ID)
	})
}

// writeFileSync writes v as JSON to path through a synced temporary file.
func writeFileSync(path string, v any) error {
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return err
	}
	tmp := path + ".tmp"
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return err
	}
	_, err = f.Write(append(b, '\n'))
	if err == nil {
		err = f.Sync()
	}
	if err2 := f.Close(); err == nil {
		err = err2
	}
	if err == nil {
		err = os.Rename(tmp, path)
	}
	if err == nil {
		err = fsutil.Sync(filepath.Dir(path))
	}
	return err
}

// Catalog is the store's catalog, for packages that keep their own records in
// it (package syncd).
func (s *Store) Catalog() *catalog.DB { return s.db }

// Close closes the database.
func (s *Store) Close() error {
	s.mu.Lock()
	pending := len(s.done) > 0
	s.mu.Unlock()
	if pending && !s.readOnly {
		s.db.Update(func(tx *catalog.Tx) error { return s.dropDone(tx) }) // else recovery drops them
	}
	return s.db.Close()
}

// finished records a journal entry whose work is done, to be deleted with the
// next journal transaction.
func (s *Store) finished(key []byte) {
	s.mu.Lock()
	s.done = append(s.done, key)
	s.mu.Unlock()
}

// dropDone deletes the finished journal entries in tx; they are forgotten only
// once tx commits (a failed transaction leaves them for the next one).
func (s *Store) dropDone(tx *catalog.Tx) error {
	s.mu.Lock()
	keys := s.done
	s.mu.Unlock()
	b := tx.Bucket(bucketPending)
	for _, k := range keys {
		if err := b.Delete(k); err != nil {
			return err
		}
	}
	tx.OnCommit(func() {
		s.mu.Lock()
		s.done = slices.DeleteFunc(s.done, func(k []byte) bool {
			return slices.ContainsFunc(keys, func(d []byte) bool { return bytes.Equal(d, k) })
		})
		s.mu.Unlock()
	})
	return nil
}

// Dir is the store's absolute directory.
func (s *Store) Dir() string { return s.dir }

// Path turns a store-relative path (as records hold them) into an absolute one.
func (s *Store) Path(rel string) string { return filepath.Join(s.dir, filepath.FromSlash(rel)) }

// LayerPath is the absolute path of layer id's file.
func (s *Store) LayerPath(id string) string { return s.Path(layerRel(id)) }

func layerRel(id string) string { return LayersDir + "/" + id + ".qcow2" }

// Recovered lists what Open did to recover from an interrupted operation.
func (s *Store) Recovered() []string { return s.recovered }

// ReadOnly reports whether the store was opened read-only.
func (s *Store) ReadOnly() bool { return s.readOnly }

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
	// Host and Start (the process's start time) tell whether the process
	// that wrote the entry still runs.
	Host  string `json:"host,omitempty"`
	Start uint64 `json:"start,omitempty"`
}

func (e *pendingEntry) owner() proc.Owner {
	return proc.Owner{Host: e.Host, PID: e.PID, Start: e.Start}
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
	err := s.db.Update(func(tx *catalog.Tx) error {
		if err := s.dropDone(tx); err != nil {
			return err
		}
		var err error
		p.key, err = putPending(tx, s.dir, op, files, true, s.now())
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("journal %s: %w", op, err)
	}
	return p, nil
}

// putPending journals files; create says they are about to be made (so they must
// not exist), else removed.
func putPending(tx *catalog.Tx, dir, op string, files []string, create bool, now time.Time) ([]byte, error) {
	b := tx.Bucket(bucketPending)
	// Files to make must not exist: an Abort would remove someone else's.
	if create {
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
	v, err := json.Marshal(pendingEntry{Op: op, Files: files, Started: now.UTC(), PID: proc.Self().PID, Host: proc.Self().Host, Start: proc.Self().Start})
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
	if err2 := p.s.db.Update(func(tx *catalog.Tx) error { return tx.Bucket(bucketPending).Delete(p.key) }); err == nil {
		err = err2
	}
	return err
}

// commit runs fn in the transaction that drops the journal entry.
func (p *Pending) commit(fn func(tx *catalog.Tx) error) error {
	if p.done {
		return errors.New("operation already finished")
	}
	err := p.s.db.Update(func(tx *catalog.Tx) error {
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
		if err := fsutil.Sync(d); err != nil && first == nil {
			first = err
		}
	}
	return first
}

// removeJournaled removes files whose records tx deletes: the files are journaled
// in the same transaction, unlinked after it commits, and the entry dropped last.
func (s *Store) removeJournaled(op string, fn func(tx *catalog.Tx) ([]string, error)) error {
	if err := s.writable(); err != nil {
		return err
	}
	var key []byte
	var files []string
	err := s.db.Update(func(tx *catalog.Tx) error {
		var err error
		files, err = fn(tx)
		if err != nil {
			return err
		}
		if len(files) == 0 {
			return nil
		}
		key, err = putPending(tx, s.dir, op, files, false, s.now())
		return err
	})
	if err != nil || key == nil {
		return err
	}
	if err := s.removeFiles(files); err != nil {
		return fmt.Errorf("%s: remove files: %w (the store's next open retries)", op, err)
	}
	return s.db.Update(func(tx *catalog.Tx) error { return tx.Bucket(bucketPending).Delete(key) })
}

// recover undoes (or completes) interrupted operations: see the package doc.
func (s *Store) recover() error {
	type ent struct {
		key []byte
		e   pendingEntry
	}
	var ents []ent
	err := s.db.View(func(tx *catalog.Tx) error {
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
		if en.e.owner().Alive() {
			continue // another process of this store is at work
		}
		var n int
		for _, f := range en.e.Files {
			if _, err := os.Lstat(s.Path(f)); err == nil {
				n++
			}
		}
		if err := s.removeFiles(en.e.Files); err != nil {
			return fmt.Errorf("recover interrupted %s: %w", en.e.Op, err)
		}
		if err := s.db.Update(func(tx *catalog.Tx) error { return tx.Bucket(bucketPending).Delete(en.key) }); err != nil {
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
			if strings.HasPrefix(e.Name(), TempPrefix) && !proc.TempAlive(e.Name()) {
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

// getJSON decodes the value at key of bucket b into v; it reports false when absent.
func getJSON(b *catalog.Bucket, key string, v any) (bool, error) {
	raw := b.Get([]byte(key))
	if raw == nil {
		return false, nil
	}
	if err := json.Unmarshal(raw, v); err != nil {
		return true, fmt.Errorf("decode %s %q: %w", b.Name(), key, err)
	}
	return true, nil
}

func putJSON(b *catalog.Bucket, key string, v any) error {
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
func directRefs(tx *catalog.Tx, id string) []Dependent {
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
func allDependents(tx *catalog.Tx, id string) []Dependent {
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
