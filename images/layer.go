package images

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"github.com/cvd-project/cvd/catalog"
	"github.com/cvd-project/cvd/disk"
	"github.com/cvd-project/cvd/internal/fsutil"
	"github.com/cvd-project/cvd/internal/proc"
)

// Kind is what a layer holds.
type Kind string

// Layer kinds.
const (
	KindBase    Kind = "base"    // an operating system for one hardware class; no parent
	KindApp     Kind = "app"     // an application set captured on a parent
	KindVersion Kind = "version" // changes captured at a seal or a check-in
)

// ParseKind checks a kind name.
func ParseKind(s string) (Kind, error) {
	switch k := Kind(s); k {
	case KindBase, KindApp, KindVersion:
		return k, nil
	}
	return "", fmt.Errorf("%w: layer kind %q: want base, app or version", ErrInvalid, s)
}

// Layer is the record of one sealed layer.
type Layer struct {
	ID          string `json:"id"`
	Parent      string `json:"parent,omitempty"`
	Kind        Kind   `json:"kind"`
	Size        int64  `json:"size"`         // virtual size in bytes
	ClusterSize int    `json:"cluster_size"` // the digest (and file) cluster size
	LayerStats
	File     string    `json:"file"`      // store-relative path
	FileSize int64     `json:"file_size"` // bytes, when sealed
	ModTime  int64     `json:"mtime_ns"`  // file modification time when sealed
	Created  time.Time `json:"created"`
	Source   string    `json:"source,omitempty"` // the file it was imported or sealed from

	Names []string `json:"names,omitempty"` // filled when read; not stored in the record
}

// ImportOptions controls Import and Seal.
type ImportOptions struct {
	// Kind of the layer; empty means base without a parent, app with one (Seal:
	// version).
	Kind Kind
	// Parent is a layer reference. Empty means: the layer the file's backing file
	// names, when that is a layer of this store; no parent when it has none.
	Parent string
	// Names are NAME:TAGs to point at the layer.
	Names []string
	// Force moves a tag that points at another layer.
	Force bool
	// Progress, when set, is called with the guest bytes walked and the total.
	Progress func(done, total int64)
}

// Import copies the layer in the file at path (qcow2 or raw; only what the file
// itself allocates, not its backing chain) into the store as a sealed layer on
// its parent, and returns its record. When the store already holds the same
// content, nothing is copied, the names are added, and existed is true.
//
// The copy is written by cvd into a temporary file in the store's layers
// directory, with the backing file name pointing at the parent inside the store and
// the backing format recorded; it is synced, made read-only and renamed into place
// before the record is committed.
func (s *Store) Import(ctx context.Context, path string, opts ImportOptions) (l *Layer, existed bool, err error) {
	return s.importLayer(ctx, "import", path, opts)
}

// Seal turns the writable overlay at path into a sealed layer on its parent. The
// overlay's backing file must be a layer of this store; the overlay itself is left
// as it is (the caller may delete it or keep writing to it).
func (s *Store) Seal(ctx context.Context, path string, opts ImportOptions) (*Layer, bool, error) {
	if opts.Parent != "" {
		return nil, false, fmt.Errorf("%w: seal takes the parent from the overlay's backing file", ErrInvalid)
	}
	if opts.Kind == "" {
		opts.Kind = KindVersion
	}
	return s.importLayer(ctx, "seal", path, opts)
}

// newLayerPath checks that a layer can be added (a writable store, valid names)
// and returns the absolute path of the file it comes from.
func (s *Store) newLayerPath(path string, names []string) (string, error) {
	if err := s.writable(); err != nil {
		return "", err
	}
	for _, nt := range names {
		if _, _, err := ParseNameTag(nt); err != nil {
			return "", err
		}
	}
	return filepath.Abs(path)
}

func (s *Store) importLayer(ctx context.Context, op, path string, opts ImportOptions) (*Layer, bool, error) {
	abs, err := s.newLayerPath(path, opts.Names)
	if err != nil {
		return nil, false, err
	}
	src, err := disk.Open(abs, disk.OpenOptions{ReadOnly: true, NoBacking: true})
	if err != nil {
		return nil, false, fmt.Errorf("%s %s: %w", op, path, err)
	}
	defer src.Close()
	info := src.Info()

	parent, err := s.findParent(abs, info, opts.Parent, op == "seal")
	if err != nil {
		return nil, false, fmt.Errorf("%s %s: %w", op, path, err)
	}
	kind, err := kindFor(opts.Kind, KindApp, parent)
	if err != nil {
		return nil, false, fmt.Errorf("%s %s: %w", op, path, err)
	}

	// Copy into a temporary file of the store, hashing as we go.
	cs := DigestClusterSize(info)
	tmp := filepath.Join(s.Path(LayersDir), proc.TempPrefix()+randHex(8)+".qcow2")
	// Like QEMU, the layer's virtual size is whole 512-byte sectors (a raw file
	// of 15 bytes makes a layer of 512, and its ID says so).
	size := (src.Size() + 511) &^ 511
	co := disk.CreateOptions{Size: size, ClusterSize: cs, AllowedRoots: []string{s.dir}}
	parentID := ""
	if parent != nil {
		parentID = parent.ID
		co.BackingFile = s.LayerPath(parent.ID)
		co.BackingFormat = disk.FormatQcow2
	}
	id, stats, err := s.writeLayer(ctx, src, tmp, co, parentID, opts.Progress)
	if err != nil {
		os.Remove(tmp)
		return nil, false, fmt.Errorf("%s %s: %w", op, path, err)
	}
	l, existed, err := s.commitLayer(tmp, id, parent, kind, size, cs, stats, abs, opts)
	if err != nil {
		os.Remove(tmp)
		return nil, false, fmt.Errorf("%s %s: %w", op, path, err)
	}
	return l, existed, nil
}

// kindFor checks a layer's kind against its parent; empty means base without a
// parent and withParent with one.
func kindFor(kind, withParent Kind, parent *Layer) (Kind, error) {
	if kind == "" {
		kind = KindBase
		if parent != nil {
			kind = withParent
		}
	}
	if _, err := ParseKind(string(kind)); err != nil {
		return "", err
	}
	if (kind == KindBase) != (parent == nil) {
		if parent == nil {
			return "", fmt.Errorf("%w: a %s layer needs a parent", ErrNoParent, kind)
		}
		return "", fmt.Errorf("%w: a base layer has no parent", ErrInvalid)
	}
	return kind, nil
}

// findParent returns the parent layer of the file at abs: the layer ref names, or
// else the layer its backing file name designates (nil for no backing file, an
// error when needBacking).
func (s *Store) findParent(abs string, info disk.Info, ref string, needBacking bool) (*Layer, error) {
	var parent *Layer
	err := s.db.View(func(tx *catalog.Tx) error {
		var pid string
		switch {
		case ref != "":
			id, err := resolveTx(tx, ref)
			if err != nil {
				return fmt.Errorf("parent: %w", err)
			}
			pid = id
		case info.BackingName != "":
			id, ok := s.layerForBacking(abs, info.BackingName)
			if !ok || getLayer(tx, id) == nil {
				return fmt.Errorf("%w: %s has backing file %q; give the parent layer", ErrNoParent, abs, info.BackingName)
			}
			pid = id
		case needBacking:
			return fmt.Errorf("%w: %s has no backing file", ErrNoParent, abs)
		}
		if pid != "" {
			parent = getLayer(tx, pid)
			if parent == nil {
				return fmt.Errorf("parent %s: %w", shortID(pid), ErrNotFound)
			}
		}
		return nil
	})
	return parent, err
}

// writeLayer writes src's own clusters into a new image at tmp and returns its ID.
// tmp is a temporary file renamed into place only after it is synced, so it is
// written without ordering barriers.
func (s *Store) writeLayer(ctx context.Context, src disk.Image, tmp string, co disk.CreateOptions, parentID string, progress func(done, total int64)) (string, LayerStats, error) {
	if err := disk.CreateFile(tmp, co); err != nil {
		return "", LayerStats{}, fmt.Errorf("create %s: %w", filepath.Base(tmp), err)
	}
	roots := co.AllowedRoots
	if len(roots) == 0 {
		roots = []string{s.dir}
	}
	dst, err := disk.Open(tmp, disk.OpenOptions{AllowedRoots: roots, NoBarriers: true})
	if err != nil {
		return "", LayerStats{}, fmt.Errorf("open %s: %w", filepath.Base(tmp), err)
	}
	h := NewIDHasher(parentID, dst.Size(), co.ClusterSize)
	w := &runWriter{dst: dst, cs: int64(co.ClusterSize)}
	var last time.Time
	err = WalkLayer(ctx, src, co.ClusterSize, parentID != "", func(idx int64, data []byte) error {
		// A source whose size is not whole sectors ends in a short cluster:
		// the layer holds it padded with zeros to its sector, and so is it hashed.
		if want := min(int64(co.ClusterSize), dst.Size()-idx*int64(co.ClusterSize)); data != nil && int64(len(data)) < want {
			data = append(data[:len(data):len(data)], make([]byte, want-int64(len(data)))...)
		}
		h.AddData(idx, data)
		if progress != nil && time.Since(last) > 100*time.Millisecond {
			last = time.Now()
			progress(idx*int64(co.ClusterSize), src.Size())
		}
		return w.add(idx, data)
	})
	if err == nil {
		err = w.flush()
	}
	if err == nil {
		err = dst.Flush()
	}
	if err2 := dst.Close(); err == nil {
		err = err2
	}
	if err != nil {
		return "", LayerStats{}, err
	}
	if progress != nil {
		progress(src.Size(), src.Size())
	}
	if err := os.Chmod(tmp, 0o444); err != nil {
		return "", LayerStats{}, err
	}
	if err := fsutil.Sync(tmp); err != nil {
		return "", LayerStats{}, err
	}
	return h.Sum(), h.Stats(), nil
}

// commitLayer records layer id, whose file is tmp, a temporary file of the store
// that it renames into place (removed when the store holds the layer already).
func (s *Store) commitLayer(tmp, id string, parent *Layer, kind Kind, size int64, cs int, stats LayerStats, source string, opts ImportOptions) (*Layer, bool, error) {
	return s.commitLayerWith(id, parent, kind, size, cs, stats, source, opts,
		func(final string) error { return os.Rename(tmp, final) },
		func() { os.Remove(tmp) })
}

// commitLayerWith records layer id under a pending journal entry: place puts its
// file at final before the record is committed (the journal removes final if the
// commit does not happen); existing is called instead when the store holds the
// layer already.
func (s *Store) commitLayerWith(id string, parent *Layer, kind Kind, size int64, cs int, stats LayerStats, source string, opts ImportOptions,
	place func(final string) error, existing func()) (*Layer, bool, error) {
	var have *Layer
	var p *Pending
	err := s.db.Update(func(tx *catalog.Tx) error {
		if l := getLayer(tx, id); l != nil {
			have = l
			if err := putNames(tx, id, opts.Names, opts.Force); err != nil {
				return err
			}
			have.Names = namesOf(tx, id)
			return nil
		}
		if err := checkNames(tx, id, opts.Names, opts.Force); err != nil {
			return err
		}
		key, err := putPending(tx, s.dir, "import", []string{layerRel(id)}, true, s.now())
		p = &Pending{s: s, key: key, files: []string{layerRel(id)}}
		return err
	})
	if err != nil {
		return nil, false, err
	}
	if have != nil {
		existing()
		return have, true, nil
	}
	final := s.LayerPath(id)
	if err := place(final); err != nil {
		p.Abort()
		return nil, false, err
	}
	if err := fsutil.Sync(filepath.Dir(final)); err != nil {
		p.Abort()
		return nil, false, err
	}
	fi, err := os.Stat(final)
	if err != nil {
		p.Abort()
		return nil, false, err
	}
	l := &Layer{ID: id, Kind: kind, Size: size, ClusterSize: cs, LayerStats: stats,
		File: layerRel(id), FileSize: fi.Size(), ModTime: fi.ModTime().UnixNano(),
		Created: s.now().UTC().Truncate(time.Second), Source: source}
	if parent != nil {
		l.Parent = parent.ID
	}
	err = p.commit(func(tx *catalog.Tx) error {
		if l.Parent != "" {
			if getLayer(tx, l.Parent) == nil {
				return fmt.Errorf("parent %s: %w", shortID(l.Parent), ErrNotFound)
			}
			if err := tx.Bucket(bucketRefs).Put(refKey(l.Parent, "layer", id), nil); err != nil {
				return err
			}
		}
		if err := putJSON(tx.Bucket(bucketLayers), id, l); err != nil {
			return err
		}
		if err := putNames(tx, id, opts.Names, opts.Force); err != nil {
			return err
		}
		l.Names = namesOf(tx, id)
		return nil
	})
	if err != nil {
		p.Abort()
		return nil, false, err
	}
	return l, false, nil
}

func checkNames(tx *catalog.Tx, id string, nameTags []string, force bool) error {
	if force {
		return nil
	}
	for _, nt := range nameTags {
		n, t, err := ParseNameTag(nt)
		if err != nil {
			return err
		}
		if old := tx.Bucket(bucketNames).Get([]byte(n + ":" + t)); old != nil && string(old) != id {
			return fmt.Errorf("%w: %s:%s points at layer %s", ErrExists, n, t, shortID(string(old)))
		}
	}
	return nil
}

// layerForBacking reports the layer ID a backing file name found in the image at
// src designates, when it is a layer file of this store.
func (s *Store) layerForBacking(src, backing string) (string, bool) {
	p := backing
	if !filepath.IsAbs(p) {
		p = filepath.Join(filepath.Dir(src), p)
	}
	if ev, err := filepath.EvalSymlinks(p); err == nil {
		p = ev
	}
	p = filepath.Clean(p)
	if filepath.Dir(p) != s.Path(LayersDir) {
		return "", false
	}
	id, ok := strings.CutSuffix(filepath.Base(p), ".qcow2")
	if !ok || len(id) != 64 || !hexRE.MatchString(id) {
		return "", false
	}
	return id, true
}

// runWriter writes the clusters of a layer copy, coalescing neighbours.
type runWriter struct {
	dst        disk.Image
	cs         int64
	buf        []byte
	bufOff     int64
	zOff, zLen int64
}

const writeChunk = 16 << 20

func (w *runWriter) add(idx int64, data []byte) error {
	off := idx * w.cs
	if data == nil {
		if err := w.flushData(); err != nil {
			return err
		}
		if w.zLen > 0 && w.zOff+w.zLen == off {
			w.zLen += w.cs
			return nil
		}
		if err := w.flushZero(); err != nil {
			return err
		}
		w.zOff, w.zLen = off, w.cs
		return nil
	}
	if err := w.flushZero(); err != nil {
		return err
	}
	if len(w.buf) > 0 && (w.bufOff+int64(len(w.buf)) != off || len(w.buf)+len(data) > writeChunk) {
		if err := w.flushData(); err != nil {
			return err
		}
	}
	if len(w.buf) == 0 {
		w.bufOff = off
	}
	w.buf = append(w.buf, data...)
	return nil
}

func (w *runWriter) flushData() error {
	if len(w.buf) == 0 {
		return nil
	}
	_, err := w.dst.WriteAt(w.buf, w.bufOff)
	w.buf = w.buf[:0]
	if err != nil {
		return fmt.Errorf("write at %#x: %w", w.bufOff, err)
	}
	return nil
}

func (w *runWriter) flushZero() error {
	if w.zLen == 0 {
		return nil
	}
	n := min(w.zLen, w.dst.Size()-w.zOff)
	err := w.dst.WriteZeroes(w.zOff, n)
	w.zLen = 0
	if err != nil {
		return fmt.Errorf("write zeroes at %#x: %w", w.zOff, err)
	}
	return nil
}

func (w *runWriter) flush() error {
	if err := w.flushData(); err != nil {
		return err
	}
	return w.flushZero()
}

func randHex(n int) string {
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		panic(err) // crypto/rand does not fail on Linux
	}
	return hex.EncodeToString(b)
}

func getLayer(tx *catalog.Tx, id string) *Layer {
	var l Layer
	ok, err := getJSON(tx.Bucket(bucketLayers), id, &l)
	if !ok || err != nil {
		return nil
	}
	return &l
}

// Layers lists every layer, oldest first, with its names.
func (s *Store) Layers() ([]Layer, error) {
	var out []Layer
	err := s.db.View(func(tx *catalog.Tx) error {
		names := allNames(tx)
		return tx.Bucket(bucketLayers).ForEach(func(k, v []byte) error {
			var l Layer
			if _, err := getJSON(tx.Bucket(bucketLayers), string(k), &l); err != nil {
				return err
			}
			l.Names = names[l.ID]
			sort.Strings(l.Names)
			out = append(out, l)
			return nil
		})
	})
	sort.SliceStable(out, func(i, j int) bool {
		if !out[i].Created.Equal(out[j].Created) {
			return out[i].Created.Before(out[j].Created)
		}
		return out[i].ID < out[j].ID
	})
	return out, err
}

// Layer returns the record of the layer ref names.
func (s *Store) Layer(ref string) (*Layer, error) {
	var l *Layer
	err := s.db.View(func(tx *catalog.Tx) error {
		id, err := resolveTx(tx, ref)
		if err != nil {
			return err
		}
		l = getLayer(tx, id)
		if l == nil {
			return fmt.Errorf("layer %s: %w", ref, ErrNotFound)
		}
		l.Names = namesOf(tx, id)
		return nil
	})
	return l, err
}

// Chain returns the layer ref names and its ancestors, top first.
func (s *Store) Chain(ref string) ([]Layer, error) {
	var out []Layer
	err := s.db.View(func(tx *catalog.Tx) error {
		id, err := resolveTx(tx, ref)
		if err != nil {
			return err
		}
		out, err = chainTx(tx, id)
		return err
	})
	return out, err
}

// Chains returns every layer in the chains of the layers tops (IDs; "" and
// unknown ones are skipped), each read once, in one read of the catalog: a
// chain's walk stops at a layer already met, so the cost follows the distinct
// layers, not the sum of the chains' depths. The layers come without names.
func (s *Store) Chains(tops []string) (map[string]*Layer, error) {
	out := map[string]*Layer{}
	err := s.db.View(func(tx *catalog.Tx) error {
		for _, t := range tops {
			for cur, n := t, 0; cur != "" && out[cur] == nil && n <= disk.DefaultMaxDepth; n++ {
				l := getLayer(tx, cur)
				if l == nil {
					break
				}
				out[cur] = l
				cur = l.Parent
			}
		}
		return nil
	})
	return out, err
}

func chainTx(tx *catalog.Tx, id string) ([]Layer, error) {
	var out []Layer
	for cur := id; cur != ""; {
		l := getLayer(tx, cur)
		if l == nil {
			return nil, fmt.Errorf("layer %s: %w (chain of %s)", shortID(cur), ErrNotFound, shortID(id))
		}
		l.Names = namesOf(tx, cur)
		out = append(out, *l)
		if len(out) > disk.DefaultMaxDepth {
			return nil, fmt.Errorf("chain of %s: %w", shortID(id), disk.ErrChainTooDeep)
		}
		cur = l.Parent
	}
	return out, nil
}

// Dependents lists everything that stands on the layer ref names, directly or not.
func (s *Store) Dependents(ref string) ([]Dependent, error) {
	var out []Dependent
	err := s.db.View(func(tx *catalog.Tx) error {
		id, err := resolveTx(tx, ref)
		if err != nil {
			return err
		}
		out = allDependents(tx, id)
		return nil
	})
	return out, err
}

// RemoveLayer removes the layer ref names, its names and its file. It refuses with
// a *DependentsError when a layer, desktop or clone stands on it.
func (s *Store) RemoveLayer(ref string) (*Layer, error) {
	var removed *Layer
	err := s.removeJournaled("layer rm", func(tx *catalog.Tx) ([]string, error) {
		id, err := resolveTx(tx, ref)
		if err != nil {
			return nil, err
		}
		l := getLayer(tx, id)
		if l == nil {
			return nil, fmt.Errorf("layer %s: %w", ref, ErrNotFound)
		}
		if deps := allDependents(tx, id); len(deps) > 0 {
			return nil, &DependentsError{What: "layer " + shortID(id), Dependents: deps}
		}
		l.Names = namesOf(tx, id)
		removed = l
		return []string{l.File}, deleteLayerTx(tx, l)
	})
	if err != nil {
		return nil, err
	}
	return removed, nil
}

func deleteLayerTx(tx *catalog.Tx, l *Layer) error {
	for _, n := range namesOf(tx, l.ID) {
		if err := tx.Bucket(bucketNames).Delete([]byte(n)); err != nil {
			return err
		}
	}
	if l.Parent != "" {
		if err := tx.Bucket(bucketRefs).Delete(refKey(l.Parent, "layer", l.ID)); err != nil {
			return err
		}
	}
	return tx.Bucket(bucketLayers).Delete([]byte(l.ID))
}

// VerifyResult is the outcome of verifying one layer.
type VerifyResult struct {
	ID       string   `json:"id"`
	OK       bool     `json:"ok"`
	Computed string   `json:"computed,omitempty"` // the ID the file's content gives now
	Problems []string `json:"problems,omitempty"`
}

// Verify recomputes the IDs of the layers refs name (all layers when none) from
// their files and checks the files' backing names, formats and modes.
func (s *Store) Verify(ctx context.Context, refs ...string) ([]VerifyResult, error) {
	var ls []Layer
	if len(refs) == 0 {
		all, err := s.Layers()
		if err != nil {
			return nil, err
		}
		ls = all
	} else {
		for _, r := range refs {
			l, err := s.Layer(r)
			if err != nil {
				return nil, err
			}
			ls = append(ls, *l)
		}
	}
	var out []VerifyResult
	for _, l := range ls {
		if err := ctx.Err(); err != nil {
			return out, err
		}
		out = append(out, s.verifyLayer(ctx, &l))
	}
	return out, nil
}

func (s *Store) verifyLayer(ctx context.Context, l *Layer) VerifyResult {
	r := VerifyResult{ID: l.ID}
	bad := func(f string, a ...any) { r.Problems = append(r.Problems, fmt.Sprintf(f, a...)) }
	path := s.Path(l.File)
	fi, err := os.Stat(path)
	if err != nil {
		bad("file: %v", err)
		return r
	}
	if fi.Mode().Perm()&0o222 != 0 {
		bad("file is writable (mode %v); sealed layers are read-only", fi.Mode().Perm())
	}
	img, err := disk.Open(path, disk.OpenOptions{ReadOnly: true, NoBacking: true})
	if err != nil {
		bad("open: %v", err)
		return r
	}
	defer img.Close()
	info := img.Info()
	if l.Parent == "" && info.BackingName != "" {
		bad("backing file name is %q, want none", info.BackingName)
	}
	if l.Parent != "" && info.BackingName != l.Parent+".qcow2" && info.BackingName != "../"+layerRel(l.Parent) {
		// The second form is an adopted top's (Adopt).
		bad("backing file name is %q, want %q", info.BackingName, l.Parent+".qcow2")
	}
	if l.Parent != "" && info.BackingFormat != disk.FormatQcow2 {
		bad("backing format is %q, want qcow2", info.BackingFormat)
	}
	id, _, err := ComputeID(ctx, img, l.Parent)
	if err != nil {
		bad("compute ID: %v", err)
		return r
	}
	r.Computed = id
	if id != l.ID {
		bad("content changed: it now has ID %s", shortID(id))
	}
	r.OK = len(r.Problems) == 0
	return r
}
