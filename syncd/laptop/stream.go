package laptop

import (
	"bufio"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"github.com/cvd-project/cvd/disk"
	"github.com/cvd-project/cvd/images"
	"github.com/cvd-project/cvd/nbd"
	"github.com/cvd-project/cvd/syncd/proto"
	"github.com/cvd-project/cvd/syncd/state"
)

// A streamed desktop runs before its layers have arrived. Each read-only layer
// the store lacks has a partial file (<stream dir>/layers/<id>.qcow2, a qcow2
// file with the layer's size and cluster size, opened alone) and its entry
// list from the server (<id>.entries, which hashes to the layer's ID: every
// cluster fetched is checked against its digest there). A disk's chain is
// served to QEMU as one raw NBD export: a read of a cluster the partial file
// holds is served from it; a miss is fetched from the server at once (ahead
// of the background fill), written into the partial file and then served.
// Layers the store holds already are read from the store.
//
// Once a partial layer holds every data cluster, its zero clusters are
// written and the file is adopted into the store (a hard link, its ID checked
// from the entry list); the export keeps reading the same file. When every
// layer is in the store, the desktop switches to the local files at its next
// start (SwitchStream).
//
// With a cache budget, the partial files' data never exceeds it: the least
// recently read clusters are discarded (their host clusters freed and reused)
// and fetched again when read.

// StreamStats is what a stream did so far.
type StreamStats struct {
	LocalBytes   int64  `json:"local_bytes"`   // data bytes local (store layers included)
	TotalBytes   int64  `json:"total_bytes"`   // data bytes of the read-only chains
	Fetched      int64  `json:"fetched_bytes"` // cluster bytes fetched by this process
	FetchedOnUse int64  `json:"fetched_on_demand_bytes"`
	Waits        int64  `json:"reads_waited"` // guest reads that waited for the server
	Failed       int64  `json:"reads_failed"` // guest reads failed (timeout)
	Evicted      int64  `json:"evicted_clusters"`
	Complete     bool   `json:"complete"`
	LastError    string `json:"last_error,omitempty"`
}

// StreamConfig tunes a stream.
type StreamConfig struct {
	// ReadTimeout bounds how long a guest read waits for a missing cluster
	// (then it fails with EIO); 20 s when 0.
	ReadTimeout time.Duration
	// CacheSize bounds the partial files' data (0: no bound; the whole
	// desktop arrives in the background).
	CacheSize int64
	// Pinned fetches every cluster (no eviction).
	Pinned bool
	// NoBackground fetches on demand (and the working set) only.
	NoBackground bool
	// WorkingWindow is how long after the start first reads are recorded as
	// the working set (3 min when 0).
	WorkingWindow time.Duration
	// Workers is how many fetches run at once (4 when 0).
	Workers int
}

// streamLayer is one read-only layer of a streamed desktop.
type streamLayer struct {
	id, parent string
	kind       string
	size, cs   int64
	state      []byte // per cluster: 0 not in the layer, 'z' zero, 'd' data
	digest     map[int64]proto.Digest
	dataN      int64
	entries    []proto.Entry // for the adoption

	path string // partial file ("" for a store layer)

	mu      sync.RWMutex // img writes, have, eviction
	img     disk.Image
	punch   *os.File // the partial file again, to punch evicted clusters out of it
	have    []bool   // data clusters local
	haveN   int64
	lastUse []int64 // written by concurrent readers: atomic access only
	local   bool    // in the store: every cluster is here
	// ws records the clusters first read within the working window.
	ws     []int64
	wsSeen map[int64]bool
}

// bytes is the layer's data bytes that are local, and all of them (whole
// clusters);
// inStore says the store holds the layer (adopted, or there before).
func (ly *streamLayer) bytes() (local, total int64, inStore bool) {
	ly.mu.RLock()
	defer ly.mu.RUnlock()
	if ly.local {
		return ly.dataN * ly.cs, ly.dataN * ly.cs, true
	}
	return ly.haveN * ly.cs, ly.dataN * ly.cs, false
}

// clusterLen is the bytes of cluster idx below the layer's size.
func (ly *streamLayer) clusterLen(idx int64) int64 { return min(ly.cs, ly.size-idx*ly.cs) }

// streamDisk is one disk's chain as an NBD export.
type streamDisk struct {
	s      *Stream
	name   string
	size   int64
	cs     int64
	layers []*streamLayer // top first
	owner  []int32        // guest cluster → layer serving it; -1 reads as zeros
}

type fetchKey struct {
	ly  *streamLayer
	idx int64
}

// Stream serves a streamed desktop's read-only chains and fetches what they
// lack. Make it with OpenStream; Run fetches, Serve serves NBD.
type Stream struct {
	l      *Laptop
	name   string
	dir    string
	cfg    StreamConfig
	client func() (*Client, error)
	disks  map[string]*streamDisk
	layers []*streamLayer // bottom up (parents first)
	start  time.Time

	wsMu     sync.Mutex // the layers' working sets (taken under a layer's lock)
	evictMu  sync.Mutex // the budget's check and reservation
	mu       sync.Mutex // the queues (never held while taking a layer's lock for writing)
	demand   []fetchKey
	waiting  map[fetchKey]chan struct{}
	inflight map[fetchKey]bool
	wanted   map[fetchKey]int // clusters readers wait for: not evicted
	bg       []fetchKey
	bgPos    int
	wake     chan struct{} // closed (and replaced) when there is work: wakes every idle worker
	lastErr  error
	clock    atomic.Int64

	fetched, fetchedOnUse, waits, failed, evicted atomic.Int64
	localData                                     atomic.Int64 // partial layers' data bytes
}

// streamDirOf is where a streamed desktop's files are.
func (l *Laptop) streamDirOf(name string) string {
	return filepath.Join(l.st.Dir, state.StreamDir, name)
}

// OpenStream opens the streamed desktop's layers as its record names them.
// client makes a client for the fetches (one per worker).
func (l *Laptop) OpenStream(co *Checkout, cfg StreamConfig, client func() (*Client, error)) (*Stream, error) {
	if co.Stream == nil {
		return nil, fmt.Errorf("desktop %s is not streamed", co.Desktop)
	}
	if cfg.ReadTimeout <= 0 {
		cfg.ReadTimeout = 20 * time.Second
	}
	if cfg.WorkingWindow <= 0 {
		cfg.WorkingWindow = 3 * time.Minute
	}
	if cfg.Workers <= 0 {
		cfg.Workers = 4
	}
	s := &Stream{l: l, name: co.Desktop, dir: l.streamDirOf(co.Desktop), cfg: cfg, client: client, disks: map[string]*streamDisk{},
		waiting: map[fetchKey]chan struct{}{}, inflight: map[fetchKey]bool{}, wanted: map[fetchKey]int{}, wake: make(chan struct{}), start: time.Now()}
	byID := map[string]*streamLayer{}
	fail := func(err error) (*Stream, error) {
		s.Close()
		return nil, err
	}
	for _, dn := range proto.DiskNames {
		sd, ok := co.Stream.Disks[dn]
		if !ok || len(sd.Layers) == 0 {
			continue
		}
		d := &streamDisk{s: s, name: dn, size: sd.Size}
		for _, li := range sd.Layers {
			ly := byID[li.ID]
			if ly == nil {
				var err error
				if ly, err = s.openLayer(li); err != nil {
					return fail(fmt.Errorf("desktop %s: layer %s: %w", co.Desktop, state.Short(li.ID), err))
				}
				byID[li.ID] = ly
				s.layers = append(s.layers, ly)
			}
			d.layers = append(d.layers, ly)
		}
		d.cs = d.layers[0].cs
		for _, ly := range d.layers {
			if ly.cs != d.cs {
				return fail(fmt.Errorf("desktop %s: the %s disk's layers have different cluster sizes (%d and %d): it cannot be streamed", co.Desktop, dn, d.cs, ly.cs))
			}
		}
		n := state.ClustersOf(d.size, int(d.cs))
		d.owner = make([]int32, n)
		for i := range d.owner {
			d.owner[i] = -1
			for k, ly := range d.layers {
				if int64(i) < int64(len(ly.state)) && ly.state[i] != 0 {
					if ly.state[i] == 'd' {
						d.owner[i] = int32(k)
					}
					break
				}
			}
		}
		s.disks[dn] = d
	}
	// Parents first, for the adoption.
	var order []*streamLayer
	for _, dn := range proto.DiskNames {
		if d := s.disks[dn]; d != nil {
			for i := len(d.layers) - 1; i >= 0; i-- {
				if !slices.Contains(order, d.layers[i]) {
					order = append(order, d.layers[i])
				}
			}
		}
	}
	s.layers = order
	return s, nil
}

// openLayer opens a layer of the chain: from the store when it is there,
// else its partial file (made the first time) and entry list.
func (s *Stream) openLayer(li proto.LayerInfo) (*streamLayer, error) {
	ly := &streamLayer{id: li.ID, parent: li.Parent, kind: li.Kind, size: li.Size, cs: int64(li.ClusterSize), digest: map[int64]proto.Digest{}}
	n := state.ClustersOf(li.Size, li.ClusterSize)
	ly.state = make([]byte, n)
	if _, err := s.l.store.Layer(li.ID); err == nil {
		img, err := s.l.store.OpenLayer(li.ID, true)
		if err != nil {
			return nil, err
		}
		ly.img, ly.local = img, true
		// The chain's owner map needs what the layer itself holds.
		err = eachRun(img, ly.cs, func(r images.ClusterRun) {
			for i := r.First; i <= r.Last && i < n; i++ {
				if r.Data {
					ly.state[i] = 'd'
					ly.dataN++
				} else {
					ly.state[i] = 'z'
				}
			}
		})
		if err != nil {
			img.Close()
			return nil, err
		}
		return ly, nil
	}
	f, err := os.Open(filepath.Join(s.dir, "layers", li.ID+".entries"))
	if err != nil {
		return nil, fmt.Errorf("entry list: %w", err)
	}
	h := proto.NewIDHasher(li.Parent, li.Size, li.ClusterSize)
	err = proto.ReadEntries(f, li.Clusters, n, li.Parent != "", func(e proto.Entry) error {
		h.Add(e)
		ly.entries = append(ly.entries, e)
		if e.Zero {
			ly.state[e.Index] = 'z'
		} else {
			ly.state[e.Index] = 'd'
			ly.digest[e.Index] = e.Digest
			ly.dataN++
		}
		return nil
	})
	f.Close()
	if err != nil {
		return nil, fmt.Errorf("entry list: %w", err)
	}
	if h.Sum() != li.ID {
		return nil, fmt.Errorf("entry list: %w: it hashes to %s", proto.ErrDigestMismatch, state.Short(h.Sum()))
	}
	ly.path = filepath.Join(s.dir, "layers", li.ID+".qcow2")
	ly.have = make([]bool, n)
	ly.lastUse = make([]int64, n)
	if _, err := os.Stat(ly.path); errors.Is(err, os.ErrNotExist) {
		// No backing file yet: the parent may not be here; it is named when
		// the layer is adopted.
		co := disk.CreateOptions{Size: li.Size, ClusterSize: li.ClusterSize}
		if err := disk.CreateFile(ly.path, co); err != nil {
			return nil, proto.NoSpace(err)
		}
	} else if !partialClean(ly.path) {
		s.l.log.Warn("partial layer left inconsistent; starting it over", "layer", state.Short(li.ID))
		os.Remove(ly.path)
		return s.openLayer(li)
	}
	img, err := disk.Open(ly.path, disk.OpenOptions{NoBacking: true, NoBarriers: true})
	if err != nil {
		return nil, err
	}
	ly.img = img
	if ly.punch, err = os.OpenFile(ly.path, os.O_RDWR, 0); err != nil {
		img.Close()
		return nil, err
	}
	// What an earlier run fetched: each cluster is checked again (the file
	// is written without barriers).
	buf := make([]byte, ly.cs)
	err = eachRun(img, ly.cs, func(r images.ClusterRun) {
		for i := r.First; i <= r.Last && i < n; i++ {
			if !r.Data {
				continue
			}
			b := buf[:ly.clusterLen(i)]
			if ly.state[i] == 'd' {
				if _, err := img.ReadAt(b, i*ly.cs); err == nil && proto.Digest(sha256.Sum256(b)) == ly.digest[i] {
					ly.have[i] = true
					ly.haveN++
					continue
				}
			}
			img.Discard(i*ly.cs, ly.clusterLen(i))
		}
	})
	if err != nil {
		img.Close()
		return nil, err
	}
	s.localData.Add(ly.haveN * ly.cs)
	return ly, nil
}

// eachRun calls fn for each run of clusters img's own layer allocates.
func eachRun(img disk.Image, cs int64, fn func(images.ClusterRun)) error {
	const window = 1 << 30
	for win := int64(0); win < img.Size(); win += window {
		runs, err := images.LayerRuns(img, win, min(window, img.Size()-win), cs)
		if err != nil {
			return err
		}
		for _, r := range runs {
			fn(r)
		}
	}
	return nil
}

// Close closes the layers' files.
func (s *Stream) Close() {
	for _, ly := range s.layers {
		ly.mu.Lock()
		if ly.img != nil {
			ly.img.Flush()
			ly.img.Close()
			ly.img = nil
		}
		if ly.punch != nil {
			ly.punch.Close()
			ly.punch = nil
		}
		ly.mu.Unlock()
	}
}

// Stats says what the stream holds and did.
func (s *Stream) Stats() StreamStats {
	st := StreamStats{Fetched: s.fetched.Load(), FetchedOnUse: s.fetchedOnUse.Load(), Waits: s.waits.Load(),
		Failed: s.failed.Load(), Evicted: s.evicted.Load(), Complete: true}
	for _, ly := range s.layers {
		local, total, inStore := ly.bytes()
		st.LocalBytes += local
		st.TotalBytes += total
		st.Complete = st.Complete && inStore
	}
	s.mu.Lock()
	if s.lastErr != nil {
		st.LastError = s.lastErr.Error()
	}
	s.mu.Unlock()
	return st
}

// Export is the disk's NBD export (nil when the desktop has no such streamed
// disk).
func (s *Stream) Export(diskName string) nbd.Export {
	if d := s.disks[diskName]; d != nil {
		return d
	}
	return nil
}

// Exports names the streamed disks.
func (s *Stream) Exports() []string {
	var out []string
	for _, dn := range proto.DiskNames {
		if s.disks[dn] != nil {
			out = append(out, dn)
		}
	}
	return out
}

func (d *streamDisk) Size() int64 { return d.size }

// Extents reports data where a layer holds data and holes reading as zeros
// elsewhere, whether the data is local yet or not.
func (d *streamDisk) Extents(off, n int64) ([]nbd.Extent, error) {
	var out []nbd.Extent
	end := min(off+n, d.size)
	for pos := off; pos < end; {
		i := pos / d.cs
		next := min((i+1)*d.cs, end)
		data := d.owner[i] >= 0
		if k := len(out); k > 0 && out[k-1].Hole == !data {
			out[k-1].Len += next - pos
		} else {
			out = append(out, nbd.Extent{Len: next - pos, Hole: !data, Zero: !data})
		}
		pos = next
	}
	return out, nil
}

// ReadAt reads the chain, fetching the clusters that are missing and waiting
// for them at most the read timeout.
func (d *streamDisk) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 || off+int64(len(p)) > d.size {
		return 0, fmt.Errorf("read %d+%d beyond the disk's %d bytes", off, len(p), d.size)
	}
	deadline := time.Now().Add(d.s.cfg.ReadTimeout)
	waited := false
	// The clusters this read waits for are not evicted before it has read
	// them (a small cache under many reads would otherwise evict them as
	// fast as they arrive).
	var wanted []fetchKey
	defer func() {
		if wanted != nil {
			d.s.want(wanted, -1)
		}
	}()
	for {
		var missing []fetchKey
		for pos := off; pos < off+int64(len(p)); {
			i := pos / d.cs
			next := min((i+1)*d.cs, off+int64(len(p)))
			dst := p[pos-off : next-off]
			if k := d.owner[i]; k < 0 {
				clear(dst)
			} else if ok, err := d.layers[k].readLocal(d.s, i, pos-i*d.cs, dst); err != nil {
				return 0, err
			} else if !ok {
				missing = append(missing, fetchKey{d.layers[k], i})
			}
			pos = next
		}
		if len(missing) == 0 {
			return len(p), nil
		}
		if !waited {
			d.s.waits.Add(1)
			waited = true
		}
		d.s.want(missing, 1)
		wanted = append(wanted, missing...)
		d.s.hint(d.readAhead(missing[len(missing)-1].idx + 1))
		if err := d.s.await(missing, deadline); err != nil {
			d.s.failed.Add(1)
			return 0, err
		}
	}
}

// want counts readers waiting for keys (n is +1 or -1); when the last reader is
// done the cache is brought back within its budget.
func (s *Stream) want(keys []fetchKey, n int) {
	s.mu.Lock()
	for _, k := range keys {
		if s.wanted[k] += n; s.wanted[k] <= 0 {
			delete(s.wanted, k)
		}
	}
	s.mu.Unlock()
	if n < 0 && s.budgeted() && s.localData.Load() > s.cfg.CacheSize {
		s.evictMu.Lock()
		s.evictTo(s.cfg.CacheSize)
		s.evictMu.Unlock()
	}
}

// readAheadClusters is how many clusters past a missed read are fetched with
// it: a guest that reads sequentially then waits once per batch, not per
// cluster.
const readAheadClusters = 16

// readAhead lists the clusters from first on (at most readAheadClusters) that a
// layer of the chain holds and that are not local.
func (d *streamDisk) readAhead(first int64) []fetchKey {
	var out []fetchKey
	for i := first; i < first+readAheadClusters && i < int64(len(d.owner)); i++ {
		if k := d.owner[i]; k >= 0 && !d.layers[k].isLocal(i) {
			out = append(out, fetchKey{d.layers[k], i})
		}
	}
	return out
}

// hint queues clusters with the missing ones a read waits for, no reader
// waiting for them.
func (s *Stream) hint(keys []fetchKey) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, k := range keys {
		if s.waiting[k] == nil && !s.inflight[k] {
			s.demand = append(s.demand, k)
		}
	}
}

// readLocal copies cluster idx's bytes [in, in+len(dst)) when the cluster is
// local; false when it is not.
func (ly *streamLayer) readLocal(s *Stream, idx, in int64, dst []byte) (bool, error) {
	ly.mu.RLock()
	defer ly.mu.RUnlock()
	if !ly.local && !ly.have[idx] {
		return false, nil
	}
	if ly.lastUse != nil {
		atomic.StoreInt64(&ly.lastUse[idx], s.clock.Add(1))
	}
	s.record(ly, idx)
	// Past the layer's end (a layer smaller than the disk) reads as zeros.
	avail := max(0, min(int64(len(dst)), ly.size-idx*ly.cs-in))
	if avail > 0 {
		if _, err := ly.img.ReadAt(dst[:avail], idx*ly.cs+in); err != nil && err != io.EOF {
			return false, fmt.Errorf("read cluster %d of layer %s here: %w", idx, state.Short(ly.id), err)
		}
	}
	clear(dst[avail:])
	return true, nil
}

// record notes a first read within the working window.
func (s *Stream) record(ly *streamLayer, idx int64) {
	if time.Since(s.start) > s.cfg.WorkingWindow {
		return
	}
	s.wsMu.Lock()
	defer s.wsMu.Unlock()
	if ly.wsSeen == nil {
		ly.wsSeen = map[int64]bool{}
	}
	if !ly.wsSeen[idx] && len(ly.ws) < proto.MaxWorkingSet {
		ly.wsSeen[idx] = true
		ly.ws = append(ly.ws, idx)
	}
}

// await asks for the missing clusters ahead of the background fill and waits
// until they arrive or the deadline passes.
func (s *Stream) await(missing []fetchKey, deadline time.Time) error {
	var chans []chan struct{}
	var keys []fetchKey
	s.mu.Lock()
	for _, k := range missing {
		if k.ly.isLocal(k.idx) {
			// It arrived since the read looked (its put found no waiter).
			continue
		}
		ch := s.waiting[k]
		if ch == nil {
			ch = make(chan struct{})
			s.waiting[k] = ch
			s.demand = append(s.demand, k)
		}
		chans = append(chans, ch)
		keys = append(keys, k)
	}
	s.mu.Unlock()
	s.poke()
	t := time.NewTimer(time.Until(deadline))
	defer t.Stop()
	for i, ch := range chans {
		select {
		case <-ch:
		case <-t.C:
			s.mu.Lock()
			last := s.lastErr
			s.mu.Unlock()
			k := keys[i]
			s.mu.Lock()
			queued := slices.Contains(s.demand, k)
			inflight := s.inflight[k]
			s.mu.Unlock()
			msg := fmt.Sprintf("cluster %d of layer %s is not local and did not arrive within %s (queued %v, in flight %v, local %v)", k.idx, state.Short(k.ly.id), s.cfg.ReadTimeout, queued, inflight, k.ly.isLocal(k.idx))
			if last != nil {
				msg += ": " + last.Error()
			}
			return errors.New(msg)
		}
	}
	return nil
}

// poke wakes the idle workers (the caller does not hold s.mu).
func (s *Stream) poke() {
	s.mu.Lock()
	close(s.wake)
	s.wake = make(chan struct{})
	s.mu.Unlock()
}

// wakeup is the channel that the next poke closes.
func (s *Stream) wakeup() <-chan struct{} {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.wake
}

// Prefetch queues clusters for the background fill, working set first: ws
// maps a layer to the clusters to fetch first.
func (s *Stream) Prefetch(ws map[string][]int64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	seen := map[fetchKey]bool{}
	add := func(k fetchKey) {
		if !seen[k] && k.ly.state[k.idx] == 'd' {
			seen[k] = true
			s.bg = append(s.bg, k)
		}
	}
	// A layer's working set names guest clusters read while a desktop on it
	// booted: here they are fetched from whichever layer of this chain serves
	// them (a newer version above may hold them now).
	for _, dn := range proto.DiskNames {
		d := s.disks[dn]
		if d == nil {
			continue
		}
		for _, ly := range d.layers {
			for _, i := range ws[ly.id] {
				if i >= 0 && i < int64(len(d.owner)) && d.owner[i] >= 0 && !d.layers[d.owner[i]].local {
					add(fetchKey{d.layers[d.owner[i]], i})
				}
			}
		}
	}
	if !s.cfg.Pinned && (s.cfg.CacheSize > 0 || s.cfg.NoBackground) {
		return // a cache fetches the working set alone ahead of use
	}
	// Then everything else, top layer of the system disk first (what the
	// guest reads comes from the top of the chain).
	for _, dn := range proto.DiskNames {
		d := s.disks[dn]
		if d == nil {
			continue
		}
		for i, k := range d.owner {
			if k >= 0 && !d.layers[k].local {
				add(fetchKey{d.layers[k], int64(i)})
			}
		}
	}
	// Clusters no disk reads (hidden under an upper layer) still belong to
	// their layer.
	for _, ly := range s.layers {
		if ly.local {
			continue
		}
		for i, st := range ly.state {
			if st == 'd' {
				add(fetchKey{ly, int64(i)})
			}
		}
	}
}

// next picks the next batch: missing clusters a read waits for first, then the
// background fill; every key of a batch is of one layer, ascending. With no
// work it returns the channel the next poke closes (taken under the same lock:
// no poke is missed).
func (s *Stream) next() (*streamLayer, []int64, bool, <-chan struct{}) {
	s.mu.Lock()
	defer s.mu.Unlock()
	pick := func(from []fetchKey, limit int) (*streamLayer, []int64, int) {
		var ly *streamLayer
		var idxs []int64
		used := 0
		for i, k := range from {
			used = i + 1
			if s.inflight[k] || k.ly.isLocal(k.idx) {
				continue
			}
			if ly == nil {
				ly = k.ly
			} else if k.ly != ly {
				used = i
				break
			}
			idxs = append(idxs, k.idx)
			s.inflight[k] = true
			if len(idxs) == limit {
				break
			}
		}
		return ly, idxs, used
	}
	// Demand: drop what arrived; take up to 64 of the first layer asked for.
	var keep []fetchKey
	var ly *streamLayer
	var idxs []int64
	for _, k := range s.demand {
		if k.ly.isLocal(k.idx) {
			if ch := s.waiting[k]; ch != nil {
				close(ch)
				delete(s.waiting, k)
			}
			continue
		}
		if s.inflight[k] {
			keep = append(keep, k)
			continue
		}
		if (ly == nil || k.ly == ly) && len(idxs) < 64 {
			ly = k.ly
			idxs = append(idxs, k.idx)
			s.inflight[k] = true
		}
		keep = append(keep, k)
	}
	s.demand = keep
	if ly != nil {
		slices.Sort(idxs)
		return ly, idxs, true, nil
	}
	if s.cfg.CacheSize > 0 && !s.cfg.Pinned && s.localData.Load() >= s.cfg.CacheSize {
		return nil, nil, false, s.wake // the cache is full: no prefetch
	}
	for s.bgPos < len(s.bg) {
		ly, idxs, used := pick(s.bg[s.bgPos:], 256)
		s.bgPos += used
		if ly != nil {
			slices.Sort(idxs)
			return ly, idxs, false, nil
		}
	}
	return nil, nil, false, s.wake
}

func (ly *streamLayer) isLocal(idx int64) bool {
	ly.mu.RLock()
	defer ly.mu.RUnlock()
	return ly.local || ly.have[idx]
}

// Run fetches until ctx ends: demand first, then the background fill; it
// adopts each layer that becomes complete.
func (s *Stream) Run(ctx context.Context) {
	var wg sync.WaitGroup
	for range s.cfg.Workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			s.worker(ctx)
		}()
	}
	wg.Wait()
}

func (s *Stream) worker(ctx context.Context) {
	c, err := s.client()
	if err != nil {
		s.setErr(err)
		return
	}
	backoff := time.Duration(0)
	for ctx.Err() == nil {
		ly, idxs, onDemand, idle := s.next()
		if ly == nil {
			select {
			case <-ctx.Done():
				return
			case <-idle:
			case <-time.After(time.Second):
			}
			continue
		}
		n, err := s.fetch(ctx, c, ly, idxs, onDemand)
		s.mu.Lock()
		for _, i := range idxs {
			delete(s.inflight, fetchKey{ly, i})
		}
		if err != nil && ctx.Err() == nil {
			s.lastErr = err
			// Not arrived: back to the queues.
			for _, i := range idxs {
				if !ly.isLocal(i) && !onDemand {
					s.bg = append(s.bg, fetchKey{ly, i})
				}
			}
		} else if err == nil {
			s.lastErr = nil
		}
		s.mu.Unlock()
		if err != nil && ctx.Err() == nil {
			s.l.log.Info("stream fetch failed; retrying", "desktop", s.name, "layer", state.Short(ly.id), "err", err)
			backoff = min(max(2*backoff, 250*time.Millisecond), 5*time.Second)
			// A guest read that waits cuts the pause short: the server may
			// be back, and the read must not wait out a long backoff.
			select {
			case <-ctx.Done():
			case <-time.After(backoff):
			case <-s.wakeup():
			}
			continue
		}
		backoff = 0
		if n > 0 {
			s.adoptComplete(ctx)
		}
	}
}

func (s *Stream) setErr(err error) {
	s.mu.Lock()
	s.lastErr = err
	s.mu.Unlock()
}

// fetch reads the clusters idxs of ly from the server, checks each against its
// digest and writes it into the partial file.
func (s *Stream) fetch(ctx context.Context, c *Client, ly *streamLayer, idxs []int64, onDemand bool) (int, error) {
	rctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	rc, err := c.ReadClusters(rctx, ly.id, idxs)
	if err != nil {
		return 0, err
	}
	defer rc.Close()
	sr := proto.NewStreamReader(bufio.NewReaderSize(rc, 256<<10))
	want := map[int64]bool{}
	for _, i := range idxs {
		want[i] = true
	}
	var payload, dst []byte
	got := 0
	for {
		f, d, pl, err := sr.Next(payload)
		if err != nil {
			return got, err
		}
		payload = pl
		switch f.Kind {
		case proto.KindEnd:
			if got != len(idxs) {
				return got, fmt.Errorf("%w: %d of %d clusters came", proto.ErrStream, got, len(idxs))
			}
			return got, nil
		case proto.KindData:
		default:
			return got, fmt.Errorf("%w: layer %s cluster %d: frame %q where data was expected", proto.ErrStream, state.Short(ly.id), f.Idx, f.Kind)
		}
		if !want[f.Idx] {
			return got, fmt.Errorf("%w: cluster %d was not asked for", proto.ErrStream, f.Idx)
		}
		delete(want, f.Idx)
		if f.N != ly.clusterLen(f.Idx) || d != ly.digest[f.Idx] {
			return got, fmt.Errorf("layer %s cluster %d: %w", state.Short(ly.id), f.Idx, proto.ErrDigestMismatch)
		}
		if cap(dst) < int(f.N) {
			dst = make([]byte, ly.cs)
		}
		raw, err := proto.DecodeCluster(f, d, pl, dst[:f.N])
		if err != nil {
			return got, err
		}
		if err := s.put(ly, f.Idx, raw); err != nil {
			return got, err
		}
		got++
		s.fetched.Add(int64(len(raw)))
		if onDemand {
			s.fetchedOnUse.Add(int64(len(raw)))
		}
	}
}

// put writes a verified cluster into the partial file and wakes its readers.
func (s *Stream) put(ly *streamLayer, idx int64, raw []byte) error {
	// Room first: with a budget, the least recently read clusters go before
	// this one is written, so that the partial files never hold more.
	if s.budgeted() {
		s.evictMu.Lock()
		if s.localData.Load()+ly.cs > s.cfg.CacheSize {
			s.evictTo(s.cfg.CacheSize * 9 / 10)
		}
		s.localData.Add(ly.cs)
		s.evictMu.Unlock()
	} else {
		s.localData.Add(ly.cs)
	}
	ly.mu.Lock()
	if ly.local || ly.have[idx] {
		ly.mu.Unlock()
		s.localData.Add(-ly.cs)
	} else {
		if _, err := ly.img.WriteAt(raw, idx*ly.cs); err != nil {
			ly.mu.Unlock()
			s.localData.Add(-ly.cs)
			return proto.NoSpace(fmt.Errorf("write cluster %d of layer %s: %w", idx, state.Short(ly.id), err))
		}
		ly.have[idx] = true
		ly.haveN++
		atomic.StoreInt64(&ly.lastUse[idx], s.clock.Add(1))
		ly.mu.Unlock()
	}
	k := fetchKey{ly, idx}
	s.mu.Lock()
	if ch := s.waiting[k]; ch != nil {
		close(ch)
		delete(s.waiting, k)
	}
	s.mu.Unlock()
	return nil
}

// budgeted reports whether a cache budget bounds the partial files.
func (s *Stream) budgeted() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.cfg.CacheSize > 0 && !s.cfg.Pinned
}

// evictTo discards the least recently read clusters of the partial files until
// their data is at most target bytes: each is discarded in the qcow2 file (its
// host cluster freed for reuse) and punched out of the file on the host.
// The caller holds evictMu.
func (s *Stream) evictTo(target int64) {
	type cand struct {
		ly  *streamLayer
		idx int64
		use int64
	}
	var cs []cand
	for _, ly := range s.layers {
		ly.mu.RLock()
		if !ly.local {
			for i, h := range ly.have {
				if h {
					cs = append(cs, cand{ly, int64(i), atomic.LoadInt64(&ly.lastUse[i])})
				}
			}
		}
		ly.mu.RUnlock()
	}
	s.mu.Lock()
	cs = slices.DeleteFunc(cs, func(c cand) bool { return s.wanted[fetchKey{c.ly, c.idx}] > 0 })
	s.mu.Unlock()
	sort.Slice(cs, func(a, b int) bool { return cs[a].use < cs[b].use })
	for _, c := range cs {
		if s.localData.Load() <= target {
			return
		}
		if err := c.ly.evict(c.idx, c.use); err != nil {
			s.setErr(err)
			return
		}
		s.localData.Add(-c.ly.cs)
		s.evicted.Add(1)
	}
}

// evict discards cluster idx when it was last read at use (not since).
func (ly *streamLayer) evict(idx, use int64) error {
	ly.mu.Lock()
	defer ly.mu.Unlock()
	if !ly.have[idx] || atomic.LoadInt64(&ly.lastUse[idx]) != use {
		return nil
	}
	off, n := idx*ly.cs, ly.clusterLen(idx)
	exts, err := ly.img.MapLayer(off, n)
	if err != nil {
		return err
	}
	if err := ly.img.Discard(off, n); err != nil {
		return fmt.Errorf("evict cluster %d of layer %s: %w", idx, state.Short(ly.id), err)
	}
	for _, e := range exts {
		if e.State == disk.Data && e.HostOff > 0 {
			// The host cluster is free in the image now; give its blocks back.
			unix.Fallocate(int(ly.punch.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, e.HostOff, ly.cs)
		}
	}
	ly.have[idx] = false
	ly.haveN--
	return nil
}

// adoptComplete adopts into the store each partial layer that holds every data
// cluster and whose parent the store holds.
func (s *Stream) adoptComplete(ctx context.Context) {
	for _, ly := range s.layers {
		ly.mu.Lock()
		ready := !ly.local && ly.haveN == ly.dataN
		ly.mu.Unlock()
		if !ready {
			continue
		}
		if ly.parent != "" {
			if _, err := s.l.store.Layer(ly.parent); err != nil {
				continue
			}
		}
		if err := s.adopt(ctx, ly); err != nil {
			s.setErr(err)
			s.l.log.Warn("adopt a streamed layer", "layer", state.Short(ly.id), "err", err)
			return
		}
	}
}

// adopt writes the layer's zero clusters and hands its file to the store.
func (s *Stream) adopt(ctx context.Context, ly *streamLayer) error {
	ly.mu.Lock()
	defer ly.mu.Unlock()
	if ly.local {
		return nil
	}
	zc, _ := ly.img.(interface{ ZeroClusters(off, n int64) error })
	for _, e := range ly.entries {
		if e.Zero {
			if zc == nil {
				return fmt.Errorf("layer %s: the partial file cannot hold zero clusters", state.Short(ly.id))
			}
			if err := zc.ZeroClusters(e.Index*ly.cs, ly.clusterLen(e.Index)); err != nil {
				return err
			}
		}
	}
	if err := ly.img.Flush(); err != nil {
		return err
	}
	if ly.parent != "" {
		if err := disk.SetBacking(ly.path, s.l.store.LayerPath(ly.parent), disk.FormatQcow2); err != nil {
			return err
		}
	}
	sums := entrySums(ly.entries, ly.size, ly.cs)
	_, _, err := s.l.store.Adopt(ctx, ly.path, images.AdoptOptions{
		ImportOptions: images.ImportOptions{Kind: images.Kind(ly.kind), Parent: ly.parent},
		WantID:        ly.id, Sums: sums, RewriteBacking: true})
	if err != nil {
		return fmt.Errorf("adopt layer %s: %w", state.Short(ly.id), err)
	}
	os.Remove(ly.path)
	ly.local = true
	s.l.log.Info("streamed layer complete", "desktop", s.name, "layer", state.Short(ly.id))
	return nil
}

// WorkingSets is what was first read within the working window, per layer.
func (s *Stream) WorkingSets() map[string][]int64 {
	s.wsMu.Lock()
	defer s.wsMu.Unlock()
	out := map[string][]int64{}
	for _, ly := range s.layers {
		if len(ly.ws) > 0 {
			out[ly.id] = slices.Clone(ly.ws)
		}
	}
	return out
}
