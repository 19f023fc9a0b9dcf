package laptop

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"syscall"
	"time"

	"github.com/cvd-project/cvd/catalog"
	"github.com/cvd-project/cvd/disk"
	"github.com/cvd-project/cvd/images"
	"github.com/cvd-project/cvd/nbd"
	"github.com/cvd-project/cvd/syncd/proto"
	"github.com/cvd-project/cvd/syncd/state"
)

// StreamRecord is a streamed check-out's part of its record: where its NBD
// socket is, each disk's writable top and read-only chain, the cache budget.
type StreamRecord struct {
	Socket    string                      `json:"socket"`
	Disks     map[string]StreamDiskRecord `json:"disks"`
	CacheSize int64                       `json:"cache_size,omitempty"`
	Pinned    bool                        `json:"pinned,omitempty"`
	// ReadTimeout bounds a guest read's wait for a missing cluster (0: the
	// stream's default).
	ReadTimeout time.Duration       `json:"read_timeout,omitempty"`
	Boot        *images.DesktopBoot `json:"boot,omitempty"`
}

// StreamDiskRecord is one disk of a streamed desktop.
type StreamDiskRecord struct {
	Size   int64             `json:"size"`
	Top    string            `json:"top"`    // the writable top (qcow2 over the NBD export)
	Layers []proto.LayerInfo `json:"layers"` // the read-only chain, top first; none for a blank disk
}

// NBDURI is the URI QEMU opens a disk's read-only chain with.
func (r *StreamRecord) NBDURI(diskName string) string {
	return "nbd+unix:///" + diskName + "?socket=" + r.Socket
}

// The store's garbage collection keeps the layers of streamed check-outs: no
// desktop of the store stands on them until the switch, but the stream has
// adopted the complete ones already.
func init() {
	images.RegisterKeeper(func(tx *catalog.Tx) ([]string, error) {
		var out []string
		err := tx.Bucket(state.BucketCheckouts).ForEach(func(k, v []byte) error {
			var co Checkout
			if json.Unmarshal(v, &co) != nil || co.Stream == nil {
				return nil
			}
			for _, sd := range co.Stream.Disks {
				for _, li := range sd.Layers {
					out = append(out, li.ID)
				}
			}
			return nil
		})
		return out, err
	})
}

// ErrStreaming refuses what a desktop still streaming cannot do yet.
var ErrStreaming = errors.New("the desktop is still streaming")

// StreamOptions controls a streaming check-out.
type StreamOptions struct {
	TTL    time.Duration
	CACert string
	// CacheSize bounds the local copy of the read-only layers (0: none).
	CacheSize int64
	// Pin fetches everything in the background (required for offline use).
	Pin bool
	// ReadTimeout bounds a guest read's wait for a missing cluster (0: 20 s).
	ReadTimeout time.Duration
}

// StreamReport says what a streaming check-out did.
type StreamReport struct {
	Desktop      string            `json:"desktop"`
	Server       string            `json:"server"`
	Version      int               `json:"version"`
	Lease        proto.Lease       `json:"lease"`
	EntryBytes   int64             `json:"entry_list_bytes"` // entry lists fetched
	LayersLocal  []string          `json:"layers_local"`     // in the store already
	LayersStream []string          `json:"layers_streamed"`
	Exports      map[string]string `json:"nbd"` // disk → NBD URI of its read-only chain
	TotalBytes   int64             `json:"total_bytes"`
	Took         float64           `json:"seconds"`
}

// socketPath is the desktop's NBD socket: in its stream directory, or under
// the system's temporary directory when that path is too long for a socket.
func (l *Laptop) socketPath(name string) string {
	p := filepath.Join(l.streamDirOf(name), "nbd.sock")
	if len(p) < 100 {
		return p
	}
	sum := sha256.Sum256([]byte(p))
	return filepath.Join(os.TempDir(), "cvd-nbd-"+hex.EncodeToString(sum[:8])+".sock")
}

// CheckOutStream takes the desktop's lease and sets it up to run before its
// layers have arrived: it fetches the entry lists of the layers the store
// lacks and makes each disk's writable top over the NBD export of its
// read-only chain. The stream itself (ServeStream) serves and fills them.
func (l *Laptop) CheckOutStream(ctx context.Context, c *Client, name string, opts StreamOptions) (*StreamReport, error) {
	start := time.Now()
	if _, err := l.PurgeExpired(ctx); err != nil {
		return nil, err
	}
	if err := images.CheckObjectName("desktop", name); err != nil {
		return nil, err
	}
	prev, err := l.Checkout(name)
	if err != nil && !errors.Is(err, proto.ErrNotCheckedOut) {
		return nil, err
	}
	if prev != nil && prev.Stream == nil {
		return nil, fmt.Errorf("desktop %s is checked out here in full already", name)
	}
	if _, err := l.store.Desktop(name); err == nil {
		return nil, fmt.Errorf("desktop %s exists in this store: a streamed check-out needs a store without it (`cvd desktop rm %s`)", name, name)
	}
	m, err := l.takeLease(ctx, c, name, opts.TTL, true, false)
	if err != nil {
		return nil, err
	}
	if m.Policy == proto.PolicyUser || !hasDisk(m, proto.DiskSystem) {
		return nil, fmt.Errorf("desktop %s: a device with the user policy holds no system disk to stream", name)
	}
	rep := &StreamReport{Desktop: name, Server: c.URL(), Version: m.Version, Lease: m.Lease, Exports: map[string]string{},
		LayersLocal: []string{}, LayersStream: []string{}}
	l.log.Debug("streamed check-out: lease", "desktop", name, "after", time.Since(start))
	// The boot files arrive while the entry lists do.
	bootDone := make(chan error, 1)
	go func() { bootDone <- l.fetchBoot(ctx, c, name, m.Boot) }()
	waitBoot := func() error {
		if bootDone == nil {
			return nil
		}
		err := <-bootDone
		bootDone = nil
		return err
	}
	defer waitBoot()
	dir := l.streamDirOf(name)
	if err := os.MkdirAll(filepath.Join(dir, "layers"), 0o700); err != nil {
		return nil, proto.NoSpace(err)
	}
	rec := &StreamRecord{Socket: l.socketPath(name), Disks: map[string]StreamDiskRecord{}, CacheSize: opts.CacheSize, Pinned: opts.Pin, Boot: m.Boot,
		ReadTimeout: opts.ReadTimeout}
	if prev != nil && prev.Stream != nil {
		rec.Pinned = rec.Pinned || prev.Stream.Pinned
		if opts.CacheSize == 0 {
			rec.CacheSize = prev.Stream.CacheSize
		}
	}
	seen := map[string]bool{}
	for _, dm := range m.Disks {
		sd := StreamDiskRecord{Size: dm.BlankSize, Top: filepath.Join(dir, dm.Name+".qcow2"), Layers: dm.Layers}
		if len(dm.Layers) > 0 {
			sd.Size = dm.Layers[0].Size
		}
		for _, li := range dm.Layers {
			if seen[li.ID] {
				continue
			}
			seen[li.ID] = true
			if err := li.Validate(); err != nil {
				return nil, fmt.Errorf("server's manifest: %w", err)
			}
			if _, err := l.store.Layer(li.ID); err == nil {
				rep.LayersLocal = append(rep.LayersLocal, li.ID)
				continue
			}
			rep.LayersStream = append(rep.LayersStream, li.ID)
			rep.TotalBytes += li.DataBytes
			n, err := l.fetchEntries(ctx, c, li, filepath.Join(dir, "layers", li.ID+".entries"))
			rep.EntryBytes += n
			if err != nil {
				return nil, err
			}
		}
		if err := l.makeStreamTop(sd, rec.NBDURI(dm.Name)); err != nil {
			return nil, err
		}
		if len(dm.Layers) > 0 {
			rep.Exports[dm.Name] = rec.NBDURI(dm.Name)
		}
		rec.Disks[dm.Name] = sd
	}
	if err := waitBoot(); err != nil {
		return nil, err
	}
	co := &Checkout{Desktop: name, Server: c.URL(), Token: c.token, CACert: opts.CACert, Pin: c.PeerPin(), Lease: m.Lease, Version: m.Version,
		Layers: map[string]string{}, BlankSizes: map[string]int64{}, CheckedOut: l.now().UTC(), Policy: m.Policy, Variant: m.Variant,
		Stream: rec}
	if prev != nil {
		co.Identity, co.BootApplied, co.CheckedOut = prev.Identity, prev.BootApplied, prev.CheckedOut
	}
	for _, dm := range m.Disks {
		co.Layers[dm.Name] = dm.Top()
		if dm.Top() == "" {
			co.BlankSizes[dm.Name] = dm.BlankSize
		}
	}
	if err := l.putCheckout(co); err != nil {
		return nil, err
	}
	l.log.Debug("streamed check-out: entry lists and tops", "desktop", name, "after", time.Since(start))
	l.report(ctx, c, co, rep.EntryBytes)
	l.defineVM(ctx, name)
	l.log.Debug("streamed check-out: VM defined", "desktop", name, "after", time.Since(start))
	rep.Took = time.Since(start).Seconds()
	return rep, nil
}

// fetchEntries fetches a layer's entry list into path, checking that it hashes
// to the layer's ID; a list there already is kept.
func (l *Laptop) fetchEntries(ctx context.Context, c *Client, li proto.LayerInfo, path string) (int64, error) {
	if _, err := os.Stat(path); err == nil {
		return 0, nil
	}
	rc, err := c.Entries(ctx, li.ID)
	if err != nil {
		return 0, fmt.Errorf("entry list of layer %s: %w", state.Short(li.ID), err)
	}
	defer rc.Close()
	tmp := path + ".tmp"
	f, err := os.Create(tmp)
	if err != nil {
		return 0, proto.NoSpace(err)
	}
	h := proto.NewIDHasher(li.Parent, li.Size, li.ClusterSize)
	cr := &countReader{r: rc}
	err = proto.ReadEntries(io.TeeReader(cr, f), li.Clusters, state.ClustersOf(li.Size, li.ClusterSize), li.Parent != "", func(e proto.Entry) error {
		h.Add(e)
		return nil
	})
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil && h.Sum() != li.ID {
		err = fmt.Errorf("%w: the entry list of layer %s hashes to %s", proto.ErrDigestMismatch, state.Short(li.ID), state.Short(h.Sum()))
	}
	if err != nil {
		os.Remove(tmp)
		return cr.n, proto.NoSpace(err)
	}
	return cr.n, os.Rename(tmp, path)
}

type countReader struct {
	r io.Reader
	n int64
}

func (c *countReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n += int64(n)
	return n, err
}

// makeStreamTop makes a disk's writable top: over the NBD export of its chain,
// or alone for a blank disk. A top there already (a rerun) stays.
func (l *Laptop) makeStreamTop(sd StreamDiskRecord, uri string) error {
	if _, err := os.Stat(sd.Top); err == nil {
		return nil
	}
	tmp := sd.Top + ".tmp"
	os.Remove(tmp)
	if err := disk.CreateFile(tmp, disk.CreateOptions{Size: sd.Size}); err != nil {
		return proto.NoSpace(err)
	}
	if len(sd.Layers) > 0 {
		if err := disk.SetBacking(tmp, uri, disk.FormatRaw); err != nil {
			os.Remove(tmp)
			return err
		}
	}
	return os.Rename(tmp, sd.Top)
}

// VMRunning reports whether the desktop's local VM runs (false without a
// hypervisor).
func (l *Laptop) VMRunning(ctx context.Context, name string) bool { return l.running(ctx, name) }

// topHasData reports whether a streamed top holds anything (it is read alone:
// its backing is an NBD export).
func topHasData(path string) (bool, error) {
	img, err := disk.Open(path, disk.OpenOptions{ReadOnly: true, NoBacking: true})
	if errors.Is(err, os.ErrNotExist) {
		return false, nil
	} else if err != nil {
		return false, err
	}
	defer img.Close()
	exts, err := img.MapLayer(0, img.Size())
	if err != nil {
		return false, err
	}
	for _, e := range exts {
		if e.State != disk.Unallocated {
			return true, nil
		}
	}
	return false, nil
}

// StreamDir is where a streamed desktop's files are (its tops, partial layers,
// entry lists and status).
func (l *Laptop) StreamDir(name string) string { return l.streamDirOf(name) }

// streamStatusFile is where a running stream writes its state each second.
func (l *Laptop) streamStatusFile(name string) string {
	return filepath.Join(l.streamDirOf(name), "status.json")
}

// StreamStatus is what `cvd status` shows of a streamed desktop.
type StreamStatus struct {
	StreamStats
	PID     int                         `json:"pid,omitempty"`
	Running bool                        `json:"serving"`
	Updated time.Time                   `json:"updated,omitzero"`
	Disks   map[string]StreamDiskStatus `json:"disks"`
}

// StreamDiskStatus is one disk of a streamed desktop.
type StreamDiskStatus struct {
	NBD        string `json:"nbd,omitempty"` // URI of its read-only chain
	Top        string `json:"top"`
	LocalBytes int64  `json:"local_bytes"`
	TotalBytes int64  `json:"total_bytes"`
}

// StreamState reads what the desktop's stream last wrote (Running says its
// process is alive).
func (l *Laptop) StreamState(name string) (*StreamStatus, error) {
	var st StreamStatus
	b, err := os.ReadFile(l.streamStatusFile(name))
	if err != nil {
		return nil, err
	}
	if err := json.Unmarshal(b, &st); err != nil {
		return nil, err
	}
	st.Running = st.PID > 0 && syscall.Kill(st.PID, 0) == nil
	return &st, nil
}

// status is the stream's state now.
func (s *Stream) status(rec *StreamRecord) StreamStatus {
	st := StreamStatus{StreamStats: s.Stats(), PID: os.Getpid(), Running: true, Updated: time.Now().UTC(), Disks: map[string]StreamDiskStatus{}}
	for dn, sd := range rec.Disks {
		ds := StreamDiskStatus{Top: sd.Top}
		if d := s.disks[dn]; d != nil {
			ds.NBD = rec.NBDURI(dn)
			for _, ly := range d.layers {
				local, total, _ := ly.bytes()
				ds.LocalBytes += local
				ds.TotalBytes += total
			}
		}
		st.Disks[dn] = ds
	}
	return st
}

// ServeOptions controls ServeStream.
type ServeOptions struct {
	StreamConfig
	// Ready, when set, is called once the socket listens.
	Ready func()
}

// ServeStream serves the streamed desktop's chains on its NBD socket and
// fills them from the server until ctx ends: the working set first, then the
// rest (or, with a cache budget, what is read). It reports the clusters read
// in the first minutes as the layers' working set, and writes its state to
// the stream's status file each second.
func (l *Laptop) ServeStream(ctx context.Context, name string, opts ServeOptions) error {
	co, err := l.Checkout(name)
	if err != nil {
		return err
	}
	if co.Stream == nil {
		return fmt.Errorf("desktop %s is not streamed (it is checked out in full)", name)
	}
	rec := co.Stream
	if st, err := l.StreamState(name); err == nil && st.Running && st.PID != os.Getpid() {
		return fmt.Errorf("desktop %s: its stream process %d runs already", name, st.PID)
	}
	cfg := opts.StreamConfig
	if cfg.CacheSize == 0 {
		cfg.CacheSize = rec.CacheSize
	}
	if cfg.ReadTimeout == 0 {
		cfg.ReadTimeout = rec.ReadTimeout
	}
	cfg.Pinned = cfg.Pinned || rec.Pinned
	newClient := func() (*Client, error) {
		return NewClient(co.Server, co.Token, ClientOptions{CACert: co.CACert, Pin: co.Pin})
	}
	s, err := l.OpenStream(co, cfg, newClient)
	if err != nil {
		return err
	}
	defer s.Close()
	// The working set of each layer, as the server has it, is asked for while
	// the exports already serve: it orders the background fill only.
	prefetch := func(ctx context.Context) {
		ws := map[string][]int64{}
		if c, err := newClient(); err == nil {
			for _, ly := range s.layers {
				wctx, cancel := context.WithTimeout(ctx, 10*time.Second)
				w, err := c.WorkingSet(wctx, ly.id)
				cancel()
				if err != nil {
					l.log.Info("working set not available", "layer", state.Short(ly.id), "err", err)
					continue
				}
				ws[ly.id] = w.Clusters
			}
		}
		s.Prefetch(ws)
		s.poke()
	}
	os.Remove(rec.Socket)
	ln, err := net.Listen("unix", rec.Socket)
	if err != nil {
		return fmt.Errorf("listen on %s: %w", rec.Socket, err)
	}
	srv := &nbd.Server{
		Lookup: func(exp string) (nbd.Export, bool) {
			e := s.Export(exp)
			return e, e != nil
		},
		Names: s.Exports,
		Log:   l.log,
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ctx, ln) }()
	fetched := make(chan struct{})
	go func() { s.Run(ctx); close(fetched) }()
	go prefetch(ctx)
	l.writeStreamStatus(name, s.status(rec))
	if opts.Ready != nil {
		opts.Ready()
	}
	l.log.Info("serving streamed desktop", "desktop", name, "socket", rec.Socket, "exports", s.Exports())
	reported := false
	report := func() {
		if reported {
			return
		}
		c, err := newClient()
		if err != nil {
			return
		}
		sets := s.WorkingSets()
		for id, cl := range sets {
			rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
			err := c.ReportWorkingSet(rctx, id, proto.WorkingSet{Clusters: cl})
			cancel()
			if err != nil {
				l.log.Info("report the working set", "layer", state.Short(id), "err", err)
				return
			}
		}
		reported = len(sets) > 0
	}
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			report()
			<-fetched
			<-served
			final := s.status(rec)
			final.PID, final.Running = 0, false
			l.writeStreamStatus(name, final)
			return nil
		case err := <-served:
			cancel()
			<-fetched
			return err
		case <-tick.C:
		}
		l.writeStreamStatus(name, s.status(rec))
		if time.Since(s.start) > s.cfg.WorkingWindow {
			report()
		}
		// A pin asked for since the start: fetch everything.
		if cur, err := l.Checkout(name); err == nil && cur.Stream != nil && cur.Stream.Pinned && !s.cfg.Pinned {
			s.mu.Lock()
			s.cfg.Pinned = true
			s.mu.Unlock()
			s.Prefetch(nil)
			s.poke()
		} else if errors.Is(err, proto.ErrNotCheckedOut) || (err == nil && cur.Stream == nil) {
			l.log.Info("the streamed check-out is gone; stopping", "desktop", name)
			cancel()
		}
	}
}

func (l *Laptop) writeStreamStatus(name string, st StreamStatus) {
	b, _ := json.MarshalIndent(st, "", "  ")
	p := l.streamStatusFile(name)
	if err := os.WriteFile(p+".tmp", b, 0o644); err == nil {
		os.Rename(p+".tmp", p)
	}
}

// StopStream stops the desktop's stream process, if one runs, and waits for
// it to end (at most timeout).
func (l *Laptop) StopStream(name string, timeout time.Duration) error {
	st, err := l.StreamState(name)
	if err != nil || !st.Running {
		return nil
	}
	if err := syscall.Kill(st.PID, syscall.SIGTERM); err != nil {
		return nil
	}
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		if syscall.Kill(st.PID, 0) != nil {
			return nil
		}
		time.Sleep(50 * time.Millisecond)
	}
	return fmt.Errorf("desktop %s: the stream process %d did not stop within %s", name, st.PID, timeout)
}

// Pin marks the streamed desktop to be fetched whole: a running stream sees it
// within a second.
func (l *Laptop) Pin(name string) (*Checkout, error) {
	co, err := l.Checkout(name)
	if err != nil {
		return nil, err
	}
	if co.Stream == nil {
		return co, nil // a full check-out holds everything
	}
	co.Stream.Pinned = true
	return co, l.putCheckout(co)
}

// SwitchStream moves a streamed desktop whose layers have all arrived onto the
// local files: the stream must be stopped and the VM down (the next start).
// The tops keep what the guest wrote: only their backing file changes.
func (l *Laptop) SwitchStream(ctx context.Context, name string) error {
	co, err := l.Checkout(name)
	if err != nil {
		return err
	}
	rec := co.Stream
	if rec == nil {
		return nil
	}
	if l.running(ctx, name) {
		return fmt.Errorf("desktop %s: %w: its VM is running; the switch to local files waits for its next start", name, proto.ErrInUse)
	}
	if st, err := l.StreamState(name); err == nil && st.Running {
		return fmt.Errorf("desktop %s: its stream (process %d) still serves: stop it first (`cvd stream stop %s`)", name, st.PID, name)
	}
	for dn, sd := range rec.Disks {
		for _, li := range sd.Layers {
			if _, err := l.store.Layer(li.ID); err != nil {
				return fmt.Errorf("desktop %s: %w: layer %s of the %s disk has not arrived yet (`cvd pin %s` fetches everything)", name, ErrStreaming, state.Short(li.ID), dn, name)
			}
		}
	}
	// The desktop in the store over fresh tops on the same layers, then the
	// streamed tops put in their place with the store layer as backing.
	full := *co
	full.Stream = nil
	full.boot = rec.Boot
	if err := l.setupDesktop(ctx, &full); err != nil {
		return err
	}
	d, err := l.store.Desktop(name)
	if err != nil {
		return err
	}
	for dn, sd := range rec.Disks {
		rel := topRel(d, dn)
		if rel == "" {
			continue
		}
		dst := l.store.Path(rel)
		fresh, err := disk.Open(dst, disk.OpenOptions{ReadOnly: true, NoBacking: true})
		if err != nil {
			return err
		}
		info := fresh.Info()
		fresh.Close()
		if info.BackingName != "" {
			if err := disk.SetBacking(sd.Top, info.BackingName, info.BackingFormat); err != nil {
				return err
			}
		}
		if err := os.Rename(sd.Top, dst); err != nil {
			return err
		}
	}
	if err := l.putCheckout(&full); err != nil {
		return err
	}
	os.Remove(rec.Socket)
	os.RemoveAll(l.streamDirOf(name))
	l.log.Info("streamed desktop switched to its local files", "desktop", name)
	l.defineVM(ctx, name)
	// Whole and local now: the lease may be an offline one. Without the
	// server the agent's next renewal does it.
	if _, err := l.Renew(ctx, name, 0); err != nil {
		l.log.Info("renew the lease after the switch", "desktop", name, "err", err)
	}
	return nil
}
