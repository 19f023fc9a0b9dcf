package laptop

import (
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"iter"
	"os"
	"path/filepath"
	"sync"

	"github.com/cvd-project/cvd/syncd/state"

	"github.com/cvd-project/cvd/disk"
	"github.com/cvd-project/cvd/images"
	"github.com/cvd-project/cvd/syncd/proto"
)

// A layer is fetched into <store>/sync/fetch/<id>.qcow2, a qcow2 file on its
// parent in the store, as the cluster stream arrives (written without the disk
// engine's ordering barriers: it is flushed at each checkpoint, and checked before
// a resume). Every checkpointInterval of
// data the file is flushed and <id>.ckpt records the next cluster index and the
// state of the ID hash; an interrupted fetch asks the server for the stream from
// there. Once the end frame arrives and the entries hash to the layer's ID, the
// file is imported into the store, which computes the ID once more.

const checkpointInterval = 16 << 20

type fetchCheckpoint struct {
	ID    string `json:"id"`
	Next  int64  `json:"next"`
	Hash  []byte `json:"hash"`
	Bytes int64  `json:"bytes"` // stream bytes received so far
}

// layerFetcher writes one layer's stream into its partial file.
type layerFetcher struct {
	l        *Laptop
	info     proto.LayerInfo
	path     string
	ckptPath string
	img      disk.Image
	h        *proto.IDHasher
	ck       fetchCheckpoint
	w        *state.StageWriter
	sinceCk  int64
	// lease asks for references to layers the laptop holds (resolved by refs);
	// "" after a reference could not be read: the stream is asked again without.
	lease string
	// enc encrypts the layer (an encrypted copy's), nil for a plain one.
	enc  *disk.Encryption
	refs *localRefs
	// byRef counts the clusters that came as references.
	byRef int64
	// entries are the layer's entries as they arrived, when this process saw
	// them all (a fetch not resumed): the store adopts the file from them
	// without reading it again.
	entries []proto.Entry
	whole   bool
}

// add records an entry of the layer: in its ID's hash, and in the list.
func (f *layerFetcher) add(e proto.Entry) {
	f.h.Add(e)
	if f.whole {
		f.entries = append(f.entries, e)
	}
}

// errRef: a referenced cluster could not be read from the laptop's own layer.
var errRef = errors.New("referenced cluster unreadable here")

// localRefs reads referenced clusters from the laptop's layers.
type localRefs struct {
	store *images.Store
	mu    sync.Mutex
	open  map[string]disk.Image
}

func newLocalRefs(store *images.Store) *localRefs {
	return &localRefs{store: store, open: map[string]disk.Image{}}
}

func (r *localRefs) close() {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, img := range r.open {
		img.Close()
	}
	r.open = map[string]disk.Image{}
}

func (r *localRefs) resolve(f proto.Frame, d proto.Digest, body, dst []byte) ([]byte, error) {
	if len(body) != proto.RefBody-sha256.Size {
		return nil, fmt.Errorf("%w: reference body", proto.ErrStream)
	}
	layer := hex.EncodeToString(body[:sha256.Size])
	idx := int64(binary.BigEndian.Uint64(body[sha256.Size:]))
	r.mu.Lock()
	img := r.open[layer]
	if img == nil {
		var err error
		img, err = r.store.OpenLayer(layer, true)
		if err != nil {
			r.mu.Unlock()
			return nil, fmt.Errorf("%w: layer %s: %v", errRef, state.Short(layer), err)
		}
		r.open[layer] = img
	}
	r.mu.Unlock()
	cs := images.DigestClusterSize(img.Info())
	if cap(dst) < cs {
		dst = make([]byte, 0, cs)
	}
	data, err := state.ReadClusterFrom(img, idx, cs, d, dst[:cs])
	if err != nil || int64(len(data)) != f.N {
		return nil, fmt.Errorf("%w: cluster %d of layer %s: %v", errRef, idx, state.Short(layer), err)
	}
	return data, nil
}

// fetchLayer fetches layer info into its partial file and returns the fetcher,
// ready for finish (the import, which needs the parent in the store), and the
// stream bytes moved by this call. The parent need not be in the store yet when
// the layer has no zero clusters: the partial file is then written without its
// backing chain (every write covers whole clusters). A zero cluster needs the
// parent below it (without one it is the same as no cluster at all).
func (l *Laptop) fetchLayer(ctx context.Context, c *Client, info proto.LayerInfo, lease string, refs *localRefs, enc *disk.Encryption) (*layerFetcher, int64, error) {
	if err := info.Validate(); err != nil {
		return nil, 0, fmt.Errorf("server's manifest: %w", err)
	}
	if err := os.MkdirAll(l.fetchDir(), 0o700); err != nil {
		return nil, 0, proto.NoSpace(err)
	}
	f := &layerFetcher{l: l, info: info, path: filepath.Join(l.fetchDir(), info.ID+".qcow2"),
		ckptPath: filepath.Join(l.fetchDir(), info.ID+".ckpt"), lease: lease, refs: refs, enc: enc}
	if err := f.open(); err != nil {
		return nil, 0, err
	}
	var moved int64
	var err error
	for i := range attempts {
		var n int64
		var done bool
		n, done, err = f.fetchFrom(ctx, c)
		moved += n
		if done {
			break
		}
		if err == nil {
			err = fmt.Errorf("%w: layer %s: stream ended early", proto.ErrStream, state.Short(info.ID))
		}
		if errors.Is(err, errRef) && f.lease != "" {
			l.log.Info("a referenced cluster is unreadable here; asking for the data", "layer", state.Short(info.ID), "err", err)
			f.lease = ""
			continue
		}
		if ctx.Err() != nil || errors.Is(err, proto.ErrDigestMismatch) || errors.Is(err, proto.ErrNoSpace) || !(retryable(err) || errors.Is(err, proto.ErrStream)) || i == attempts-1 {
			f.close()
			return nil, moved, err
		}
		l.log.Info("layer stream cut; resuming", "layer", state.Short(info.ID), "at", f.ck.Next, "err", err)
	}
	if err != nil {
		f.close()
		return nil, moved, err
	}
	if err := f.w.Flush(); err != nil {
		f.close()
		return nil, moved, err
	}
	f.close()
	return f, moved, nil
}

func (f *layerFetcher) open() error {
	f.h = proto.NewIDHasher(f.info.Parent, f.info.Size, f.info.ClusterSize)
	if b, err := os.ReadFile(f.ckptPath); err == nil {
		if json.Unmarshal(b, &f.ck) == nil && f.ck.ID == f.info.ID && f.h.Restore(f.ck.Hash) == nil && partialClean(f.path) {
			img, err := f.openPartial()
			if err == nil && img.Info().Encrypted != (f.enc != nil) {
				// Begun by a check-out of the other kind: start over.
				img.Close()
				err = errors.New("partial layer of the other kind")
			}
			if err == nil {
				f.img = img
				f.w = state.NewStageWriter(img, int64(f.info.ClusterSize))
				f.l.log.Info("resuming layer fetch", "layer", state.Short(f.info.ID), "from", f.ck.Next)
				return nil
			}
		}
	}
	// Start over.
	os.Remove(f.ckptPath)
	os.Remove(f.path)
	f.h = proto.NewIDHasher(f.info.Parent, f.info.Size, f.info.ClusterSize)
	f.ck = fetchCheckpoint{ID: f.info.ID}
	f.whole, f.entries = true, make([]proto.Entry, 0, f.info.Clusters)
	// With the size and backing format given, the parent is not opened: it may
	// still be on its way into the store.
	co := disk.CreateOptions{Size: f.info.Size, ClusterSize: f.info.ClusterSize, AllowedRoots: []string{f.l.store.Dir()}, Encrypt: f.enc}
	if f.info.Parent != "" {
		co.BackingFile = f.l.store.LayerPath(f.info.Parent)
		co.BackingFormat = disk.FormatQcow2
	}
	if err := disk.CreateFile(f.path, co); err != nil {
		os.Remove(f.path)
		return proto.NoSpace(fmt.Errorf("create %s: %w", f.path, err))
	}
	img, err := f.openPartial()
	if err != nil {
		os.Remove(f.path)
		return err
	}
	f.img = img
	f.w = state.NewStageWriter(img, int64(f.info.ClusterSize))
	return f.checkpoint()
}

// openPartial opens the partial file for writing: with its parent below when the
// layer has zero clusters (the parent must be in the store then), alone otherwise.
func (f *layerFetcher) openPartial() (disk.Image, error) {
	alone := f.info.Parent == "" || f.info.Clusters == f.info.DataClusters
	opts := disk.OpenOptions{NoBacking: alone, NoBarriers: true, DirectData: true, AllowedRoots: []string{f.l.store.Dir()}}
	if f.enc != nil {
		opts.Keys = disk.Keys(f.enc.Key)
		if !alone {
			opts.Keys = nil // the keyring opens the parent too
		}
	}
	return disk.Open(f.path, opts)
}

// partialClean checks a partial layer left by an interrupted fetch: it is written
// without the engine's ordering barriers, so a killed fetch may leave it
// inconsistent after its last checkpoint. Leaks are repaired; anything worse
// starts the layer over.
func partialClean(path string) bool {
	r, err := disk.Check(path, true)
	return err == nil && r.Corruptions == r.CorruptionsFixed && r.CheckErrors == 0
}

func (f *layerFetcher) close() {
	if f.w != nil {
		f.w.Wait()
	}
	if f.img != nil {
		f.img.Close()
		f.img = nil
	}
}

// checkpoint makes what was written durable and records where to resume.
func (f *layerFetcher) checkpoint() error {
	if err := f.w.Flush(); err != nil {
		return err
	}
	hs, err := f.h.State()
	if err != nil {
		return err
	}
	f.ck.Hash = hs
	b, _ := json.Marshal(f.ck)
	tmp := f.ckptPath + ".tmp"
	if err := writeFileSync(tmp, b); err != nil {
		return proto.NoSpace(err)
	}
	f.sinceCk = 0
	return os.Rename(tmp, f.ckptPath)
}

func writeFileSync(path string, b []byte) error {
	fh, err := os.OpenFile(path, os.O_CREATE|os.O_TRUNC|os.O_WRONLY, 0o600)
	if err != nil {
		return err
	}
	_, err = fh.Write(b)
	if err == nil {
		err = fh.Sync()
	}
	if err2 := fh.Close(); err == nil {
		err = err2
	}
	return err
}

// fetchFrom reads the stream from the checkpoint on; done means the end frame
// arrived and the entries hash to the layer's ID.
func (f *layerFetcher) fetchFrom(ctx context.Context, c *Client) (int64, bool, error) {
	rc, err := c.Clusters(ctx, f.info.ID, f.ck.Next, f.lease)
	if err != nil {
		return 0, false, err
	}
	defer rc.Close()
	return f.consume(ctx, proto.NewStreamReader(rc))
}

// consume writes the frames of sr into the partial layer.
func (f *layerFetcher) consume(ctx context.Context, sr *proto.StreamReader) (int64, bool, error) {
	base := f.ck.Bytes
	cs := int64(f.info.ClusterSize)
	clusters := state.ClustersOf(f.info.Size, f.info.ClusterSize)
	last := f.ck.Next - 1
	zeros := proto.ZeroRun{Write: func(start, n int64) error {
		f.w.Sync()
		if f.w.Err != nil {
			return f.w.Err
		}
		off := start * cs
		return proto.NoSpace(f.img.WriteZeroes(off, min(n*cs, f.info.Size-off)))
	}}
	progress := f.l.opts.Progress
	var resolve proto.RefResolver
	if f.refs != nil && f.lease != "" {
		resolve = f.refs.resolve
	}
	end, endID, err := proto.DecodeOrdered(ctx, sr, f.info.Parent != "", resolve, func(fr proto.Frame, d proto.Digest) error {
		if fr.Idx <= last || fr.Idx >= clusters {
			return fmt.Errorf("%w: cluster %d out of order", proto.ErrStream, fr.Idx)
		}
		if exp := min(cs, f.info.Size-fr.Idx*cs); fr.N != exp {
			return fmt.Errorf("%w: cluster %d: %d bytes, want %d", proto.ErrStream, fr.Idx, fr.N, exp)
		}
		last = fr.Idx
		return nil
	}, func(fr proto.Frame, d proto.Digest, raw []byte) error {
		if fr.Kind == proto.KindZero {
			if fr.Idx < f.ck.Next || fr.Idx+fr.N > clusters {
				return fmt.Errorf("%w: zero run %d+%d out of order", proto.ErrStream, fr.Idx, fr.N)
			}
			for i := int64(0); i < fr.N; i++ {
				f.add(proto.Entry{Index: fr.Idx + i, Zero: true})
			}
			if err := zeros.Add(fr.Idx, fr.N); err != nil {
				return err
			}
			f.ck.Next = fr.Idx + fr.N
			return nil
		}
		if fr.Idx < f.ck.Next {
			return fmt.Errorf("%w: cluster %d out of order", proto.ErrStream, fr.Idx)
		}
		if images.IsZero(raw) {
			// A data cluster of zeros is a zero cluster, in the layer's ID as
			// on disk: stored as zero (over a parent) or not at all.
			f.ck.Next = fr.Idx + 1
			if f.info.Parent == "" {
				return nil
			}
			f.add(proto.Entry{Index: fr.Idx, Zero: true})
			return zeros.Add(fr.Idx, 1)
		}
		if err := zeros.Flush(); err != nil {
			return err
		}
		f.add(proto.Entry{Index: fr.Idx, Digest: d})
		if f.h.Data > f.info.DataClusters {
			// Writing stops at what the layer declared (and the free space was
			// checked for): a stream may not write more.
			return fmt.Errorf("%w: more data clusters than the %d declared", proto.ErrStream, f.info.DataClusters)
		}
		if fr.Kind == proto.KindRef {
			f.byRef++
		}
		if err := f.w.Write(fr.Idx, raw); err != nil {
			return err
		}
		f.ck.Next = fr.Idx + 1
		f.sinceCk += int64(len(raw))
		progress.Add(int64(len(raw)))
		if f.sinceCk >= checkpointInterval {
			f.ck.Bytes = base + sr.Bytes()
			return f.checkpoint()
		}
		return nil
	})
	if err == nil {
		err = zeros.Flush()
	}
	moved := sr.Bytes()
	f.ck.Bytes = base + moved
	if cerr := f.checkpoint(); err == nil {
		err = cerr
	}
	if err != nil {
		return moved, false, err
	}
	if f.h.Sum() != f.info.ID || fmt.Sprintf("%x", endID[:]) != f.info.ID {
		return moved, false, fmt.Errorf("%w: layer %s: the stream's entries hash to %s", proto.ErrDigestMismatch, state.Short(f.info.ID), state.Short(f.h.Sum()))
	}
	if f.h.Count != f.info.Clusters {
		return moved, false, fmt.Errorf("%w: layer %s: %d entries, the layer has %d", proto.ErrStream, state.Short(f.info.ID), f.h.Count, f.info.Clusters)
	}
	if end.Idx < 0 {
		return moved, false, fmt.Errorf("%w: end frame", proto.ErrStream)
	}
	return moved, true, nil
}

// entrySums lists a layer's entries as the store's adoption takes them.
func entrySums(entries []proto.Entry, size, cs int64) iter.Seq[images.ClusterSum] {
	return func(yield func(images.ClusterSum) bool) {
		for _, e := range entries {
			s := images.ClusterSum{Index: e.Index, Zero: e.Zero, Digest: e.Digest}
			if !e.Zero {
				s.Len = int(min(cs, size-e.Index*cs))
			}
			if !yield(s) {
				return
			}
		}
	}
}

// finish imports the complete file into the store (which must hold its parent by
// now) and removes the fetch files.
func (f *layerFetcher) finish(ctx context.Context) error {
	if f.w != nil && f.img != nil {
		if err := f.w.Flush(); err != nil {
			return err
		}
	}
	f.close()
	opts := images.ImportOptions{Kind: images.Kind(f.info.Kind), Parent: f.info.Parent}
	if f.whole && int64(len(f.entries)) == f.info.Clusters {
		// Every entry was seen and checked here: the store takes the file as
		// it is (a hard link, the ID from the entries) instead of a copy.
		sums := entrySums(f.entries, f.info.Size, int64(f.info.ClusterSize))
		_, _, err := f.l.store.Adopt(ctx, f.path, images.AdoptOptions{ImportOptions: opts, WantID: f.info.ID, Sums: sums, RewriteBacking: true})
		if err == nil {
			os.Remove(f.path)
			os.Remove(f.ckptPath)
			return nil
		}
		if !errors.Is(err, images.ErrNotAdoptable) {
			return proto.NoSpace(fmt.Errorf("adopt fetched layer %s: %w", state.Short(f.info.ID), err))
		}
		f.l.log.Info("fetched layer not adoptable; importing a copy", "layer", state.Short(f.info.ID), "err", err)
	}
	l, existed, err := f.l.store.Import(ctx, f.path, opts)
	if err != nil {
		return proto.NoSpace(fmt.Errorf("import fetched layer %s: %w", state.Short(f.info.ID), err))
	}
	if l.ID != f.info.ID {
		if !existed {
			f.l.store.RemoveLayer(l.ID)
		}
		os.Remove(f.path)
		os.Remove(f.ckptPath)
		return fmt.Errorf("%w: fetched layer %s imports as %s", proto.ErrDigestMismatch, state.Short(f.info.ID), state.Short(l.ID))
	}
	os.Remove(f.path)
	os.Remove(f.ckptPath)
	return nil
}
