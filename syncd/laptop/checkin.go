package laptop

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/cvd-project/cvd/syncd/state"

	"github.com/cvd-project/cvd/desktop"
	"github.com/cvd-project/cvd/disk"
	"github.com/cvd-project/cvd/images"
	"github.com/cvd-project/cvd/syncd/proto"
)

// CheckinOptions controls a check-in.
type CheckinOptions struct {
	// Release gives the lease back once the version is committed, and removes the
	// desktop from the laptop (its layers stay until gc).
	Release bool
	// Server and CACert replace the ones recorded at check-out (a server that
	// moved); they are remembered.
	Server, CACert string
	// RateLimit caps the bytes per second the check-in moves (0: no cap).
	RateLimit int64
	// UserOnly sends the user disk's changes alone (what an inactive device of
	// the desktop's group may push); the system disk's stay local.
	UserOnly bool
	// Snapshot sends every change as a snapshot: a version kept beside the
	// head (a device's state as it becomes active), which it does not move.
	Snapshot bool
}

// CheckinReport says what a check-in did.
type CheckinReport struct {
	Desktop      string            `json:"desktop"`
	Version      int               `json:"version"`
	Head         int               `json:"head"`
	Conflict     bool              `json:"conflict,omitempty"`
	Base         int               `json:"base"`
	Layers       map[string]string `json:"layers"`
	Changed      int64             `json:"changed_clusters"` // clusters the tops allocate
	ChangedBytes int64             `json:"changed_bytes"`    // data bytes of those (zero clusters carry none)
	Sent         int64             `json:"sent_clusters"`    // clusters sent (this run)
	Payload      int64             `json:"payload_bytes"`    // cluster stream bytes sent (this run)
	Metadata     int64             `json:"metadata_bytes"`   // every other HTTP body byte (lists, JSON)
	Deduplicated int64             `json:"deduplicated"`     // clusters the server took from its own layers
	Released     bool              `json:"released,omitempty"`
	Resumed      bool              `json:"resumed,omitempty"`
	NoChanges    bool              `json:"no_changes,omitempty"`
	// Merge: the server merged this check-in's user files with the head's
	// (it was a conflict on the user disk); the merged version is the head.
	Merge      *proto.MergeResult `json:"merge,omitempty"`
	Took       float64            `json:"seconds"`
	TookUpload float64            `json:"upload_seconds"`
}

// diskChanges is what one top holds.
type diskChanges struct {
	name  string
	top   string // absolute path
	decl  proto.CheckinDisk
	list  []byte
	bytes int64
	stat  os.FileInfo // the top's, before the scan
}

// unchanged reports whether the top still looks as it did before the scan (size,
// modification and change times), so that the scan's list describes it.
func (ch *diskChanges) unchanged() bool {
	fi, err := os.Stat(ch.top)
	if err != nil || ch.stat == nil || fi.Size() != ch.stat.Size() || !fi.ModTime().Equal(ch.stat.ModTime()) {
		return false
	}
	a, aok := fi.Sys().(*syscall.Stat_t)
	b, bok := ch.stat.Sys().(*syscall.Stat_t)
	return aok && bok && a.Ino == b.Ino && a.Ctim == b.Ctim
}

// CheckIn sends the changes of the desktop's tops to the server as a new version
// and freezes the tops locally as that version (see the package documentation).
func (l *Laptop) CheckIn(ctx context.Context, name string, opts CheckinOptions) (rep *CheckinReport, err error) {
	defer func() {
		// A device ordered wiped shreds its copies at this contact too.
		if errors.Is(err, proto.ErrWiped) {
			if co, cerr := l.Checkout(name); cerr == nil {
				err = errors.Join(err, l.wiped(ctx, co.Server))
			}
		}
	}()
	start := time.Now()
	if _, err := l.PurgeExpired(ctx); err != nil {
		return nil, err
	}
	co, err := l.Checkout(name)
	if err != nil {
		if errors.Is(err, proto.ErrNotCheckedOut) {
			return nil, fmt.Errorf("%w (it may have expired and been purged)", err)
		}
		return nil, err
	}
	if co.Offline {
		return nil, fmt.Errorf("desktop %s was imported from an offline bundle: there is no server to check it in to", name)
	}
	if co.Stream != nil {
		return nil, fmt.Errorf("desktop %s: %w: its changes are checked in once every layer has arrived and it has switched to local files at its next start (`cvd pin %s` fetches the rest; `cvd status %s` shows how much is local)", name, ErrStreaming, name, name)
	}
	if opts.Server != "" || opts.CACert != "" {
		if opts.Server != "" {
			co.Server = opts.Server
		}
		if opts.CACert != "" {
			co.CACert = opts.CACert
		}
		if err := l.putCheckout(co); err != nil {
			return nil, err
		}
	}
	if r, ok := l.opts.VM.(runningVM); ok && r.Running(ctx, name) {
		return nil, fmt.Errorf("desktop %s: %w: its VM is running: shut it down first (its disks must not change during a check-in)", name, proto.ErrInUse)
	}
	d, err := l.store.Desktop(name)
	if err != nil {
		return nil, err
	}
	if err := desktop.CheckNotInUse(l.store, d); err != nil {
		return nil, err
	}
	c, err := NewClient(co.Server, co.Token, ClientOptions{CACert: co.CACert, Pin: co.Pin, RateLimit: opts.RateLimit})
	if err != nil {
		return nil, err
	}
	rep = &CheckinReport{Desktop: name, Base: co.Version, Layers: map[string]string{}}
	var res *proto.CheckinResult
	var changes []diskChanges // what the scan listed (none when resuming)
	if co.Pending != nil && co.Pending.Result != nil {
		res = co.Pending.Result
		rep.Resumed = true
		rep.Base = co.Pending.Base
	} else {
		t0 := time.Now()
		changes, err = l.scanTops(ctx, d, co)
		if err != nil {
			return nil, err
		}
		if opts.UserOnly {
			changes = slices.DeleteFunc(changes, func(ch diskChanges) bool { return ch.name == proto.DiskSystem })
		}
		l.log.Debug("check-in: scanned tops", "took", time.Since(t0))
		var total int64
		for _, ch := range changes {
			rep.Changed += ch.decl.Entries
			rep.ChangedBytes += ch.bytes
			total += ch.decl.Entries
		}
		if total == 0 {
			rep.NoChanges = true
			rep.Version, rep.Head = co.Version, co.Version
			if opts.Release {
				if err := c.Release(ctx, name, co.Lease.ID); err != nil {
					return nil, err
				}
				if err := l.removeCopy(ctx, co); err != nil {
					return nil, err
				}
				rep.Released = true
			}
			rep.Took = time.Since(start).Seconds()
			return rep, nil
		}
		// Room for freezing the tops into layers afterwards.
		if err := state.CheckFree(l.store.Dir(), rep.ChangedBytes+32<<20); err != nil {
			return nil, err
		}
		req := checkinRequest(co, changes, opts.Release, opts.Snapshot)
		if co.Pending != nil && co.Pending.ID == req.ID {
			rep.Resumed = true
		}
		co.Pending = &PendingCheckin{ID: req.ID, Base: co.Version, Release: opts.Release}
		if err := l.putCheckout(co); err != nil {
			return nil, err
		}
		upStart := time.Now()
		res, err = l.send(ctx, c, req, changes, rep)
		rep.TookUpload = time.Since(upStart).Seconds()
		rep.Metadata = c.Sent.Load() + c.Received.Load() // upload streams are not counted in Sent
		if err != nil {
			return nil, err
		}
		co.Pending.Result = res
		if err := l.putCheckout(co); err != nil {
			return nil, err
		}
	}
	// A release removes the local copy (the server released the lease, or it was
	// not this laptop's any more); otherwise the tops become the version the server
	// committed.
	release := res.Released || (co.Pending != nil && co.Pending.Release)
	if !release {
		t0 := time.Now()
		if err := l.freeze(ctx, d, co, res, changes); err != nil {
			return nil, err
		}
		l.log.Debug("check-in: froze tops", "took", time.Since(t0))
		l.defineVM(ctx, name) // the chains changed: declare them again
	}
	rep.Version, rep.Head, rep.Conflict, rep.Deduplicated, rep.Released = res.Version, res.Head, res.Conflict, res.Deduplicated, release
	rep.Merge = res.Merge
	for k, v := range res.Layers {
		rep.Layers[k] = v
	}
	co.Version = res.Version
	co.LastCheckin = l.now().UTC()
	co.Pending = nil
	if release {
		if err := l.removeCopy(ctx, co); err != nil {
			return nil, err
		}
	} else if err := l.putCheckout(co); err != nil {
		return nil, err
	} else {
		l.report(ctx, c, co, -1)
	}
	rep.Took = time.Since(start).Seconds()
	return rep, nil
}

// checkinID names a check-in by what it sends, so that a rerun of an interrupted
// one finds it on the server.
func checkinID(req *proto.CheckinRequest) string {
	h := sha256.New()
	b, _ := json.Marshal(struct {
		D string
		L string
		B int
		K []proto.CheckinDisk
		S bool `json:",omitempty"`
	}{req.Desktop, req.Lease, req.Base, req.Disks, req.Snapshot})
	h.Write(b)
	return hex.EncodeToString(h.Sum(nil))[:32]
}

// checkinRequest is the request of a check-in of the changes scanned, with its ID.
func checkinRequest(co *Checkout, changes []diskChanges, release, snapshot bool) *proto.CheckinRequest {
	req := &proto.CheckinRequest{Desktop: co.Desktop, Lease: co.Lease.ID, Base: co.Version, Release: release, Snapshot: snapshot}
	for _, ch := range changes {
		req.Disks = append(req.Disks, ch.decl)
	}
	req.ID = checkinID(req)
	return req
}

// PreparedCheckin is a check-in as the laptop would send it: the request and
// each changed disk's entry list (proto.AppendEntry records).
type PreparedCheckin struct {
	Request *proto.CheckinRequest
	Lists   map[string][]byte // disk name → entry list
}

// PrepareCheckin scans the desktop's tops and returns the check-in a CheckIn
// would open, sending and changing nothing (nil when the tops hold nothing).
func (l *Laptop) PrepareCheckin(ctx context.Context, name string) (*PreparedCheckin, error) {
	co, err := l.Checkout(name)
	if err != nil {
		return nil, err
	}
	d, err := l.store.Desktop(name)
	if err != nil {
		return nil, err
	}
	changes, err := l.scanTops(ctx, d, co)
	if err != nil || len(changes) == 0 {
		return nil, err
	}
	p := &PreparedCheckin{Request: checkinRequest(co, changes, false, false), Lists: map[string][]byte{}}
	for _, ch := range changes {
		p.Lists[ch.name] = ch.list
	}
	return p, nil
}

// scanTops lists what each top allocates (MapLayer of the top: no scan of the
// disk), with each data cluster's digest.
func (l *Laptop) scanTops(ctx context.Context, d *images.Desktop, co *Checkout) ([]diskChanges, error) {
	var out []diskChanges
	for _, dn := range proto.DiskNames {
		rel := topRel(d, dn)
		if rel == "" {
			continue
		}
		parent, ok := co.Layers[dn]
		if !ok {
			return nil, fmt.Errorf("desktop %s: the record has no %s disk", d.Name, dn)
		}
		path := l.store.Path(rel)
		st, err := os.Stat(path)
		if err != nil {
			return nil, err
		}
		img, err := disk.Open(path, disk.OpenOptions{ReadOnly: true, NoBacking: true})
		if err != nil {
			return nil, err
		}
		info := img.Info()
		backing := ""
		if info.BackingName != "" {
			backing = trimLayerName(info.BackingName)
		}
		if backing != parent {
			img.Close()
			return nil, fmt.Errorf("desktop %s: the %s top stands on %q, the check-out record says %q", d.Name, dn, state.Short(backing), state.Short(parent))
		}
		cs := images.DigestClusterSize(info)
		ch := diskChanges{name: dn, top: path, stat: st,
			decl: proto.CheckinDisk{Name: dn, Parent: parent, Size: img.Size(), ClusterSize: cs}}
		h := proto.NewIDHasher(parent, img.Size(), cs)
		err = images.SumLayer(ctx, img, cs, parent != "", func(s images.ClusterSum) error {
			e := proto.Entry{Index: s.Index, Zero: s.Zero, Digest: s.Digest}
			ch.bytes += int64(s.Len)
			h.Add(e)
			ch.list = proto.AppendEntry(ch.list, e)
			return nil
		})
		img.Close()
		if err != nil {
			return nil, err
		}
		ch.decl.Entries, ch.decl.DataEntries = h.Count, h.Data
		if h.Count > 0 {
			ch.decl.ExpectID = h.Sum()
		}
		out = append(out, ch)
	}
	return out, nil
}

// send runs the exchange: open, entry lists, then rounds of missing → upload →
// commit, bounded.
func (l *Laptop) send(ctx context.Context, c *Client, req *proto.CheckinRequest, changes []diskChanges, rep *CheckinReport) (*proto.CheckinResult, error) {
	st, err := c.OpenCheckin(ctx, req)
	if err != nil {
		return nil, err
	}
	if st.State == proto.SessionCommitted && st.Committed != nil {
		return st.Committed, nil
	}
	for _, ch := range changes {
		if containsString(st.Lists, ch.name) {
			continue
		}
		if _, err := c.PutEntries(ctx, req.ID, ch.name, ch.list); err != nil {
			return nil, err
		}
	}
	const rounds = 4
	var lastErr error
	for range rounds {
		miss, err := c.Missing(ctx, req.ID)
		if err != nil {
			return nil, err
		}
		if len(miss) > 0 {
			if err := l.upload(ctx, c, req.ID, changes, miss, rep); err != nil {
				if errors.Is(err, proto.ErrDigestMismatch) {
					err = fmt.Errorf("%w (a disk changed since the check-in began? run it again)", err)
				}
				if errors.Is(err, proto.ErrIncomplete) && ctx.Err() == nil {
					// The server still finishes an upload of an interrupted run.
					lastErr = err
					time.Sleep(500 * time.Millisecond)
					continue
				}
				if errors.Is(err, proto.ErrDigestMismatch) || errors.Is(err, proto.ErrNoSpace) || errors.Is(err, proto.ErrBadRequest) || ctx.Err() != nil || !retryable(err) {
					return nil, err
				}
				lastErr = err
				continue
			}
		}
		res, err := c.Commit(ctx, req.ID)
		if err == nil {
			return res, nil
		}
		if !errors.Is(err, proto.ErrIncomplete) {
			return nil, err
		}
		lastErr = err
		time.Sleep(200 * time.Millisecond)
	}
	return nil, fmt.Errorf("check-in %s did not complete after %d rounds: %w", req.ID, rounds, lastErr)
}

func containsString(ss []string, s string) bool {
	for _, x := range ss {
		if x == s {
			return true
		}
	}
	return false
}

// upload streams the missing clusters, read from the tops.
func (l *Laptop) upload(ctx context.Context, c *Client, id string, changes []diskChanges, miss []proto.MissingItem, rep *CheckinReport) error {
	imgs := map[byte]disk.Image{}
	sizes := map[byte]int{}
	defer func() {
		for _, im := range imgs {
			im.Close()
		}
	}()
	var total int64
	for _, ch := range changes {
		no, _ := proto.DiskNumber(ch.name)
		img, err := disk.Open(ch.top, disk.OpenOptions{ReadOnly: true, NoBacking: true})
		if err != nil {
			return err
		}
		imgs[no], sizes[no] = img, ch.decl.ClusterSize
	}
	for _, m := range miss {
		if imgs[m.Disk] == nil {
			return fmt.Errorf("%w: the server asks for disk %d", proto.ErrStream, m.Disk)
		}
		total += int64(sizes[m.Disk])
	}
	l.opts.Progress.Start("check-in "+id[:12], total)
	defer l.opts.Progress.Done()
	// The stream is written straight into the connection (funcBody); a
	// cancelled context stops the encoder when the request ends early.
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var sent int64
	body := proto.NewFuncBody(func(w io.Writer) error {
		sw := proto.NewStreamWriter(w)
		err := proto.EncodeOrdered(ctx, proto.EncodeOptions{Compress: true}, func(submit func(byte, int64, []byte, *proto.Digest) error) error {
			return readMissingClusters(ctx, imgs, sizes, miss, submit)
		}, func(ec proto.EncodedCluster, _ bool) error {
			if m := miss[sent]; ec.Disk != m.Disk || ec.Idx != m.Index {
				return fmt.Errorf("cluster %d out of order in the upload", ec.Idx)
			}
			sent++
			l.opts.Progress.Add(int64(ec.Raw))
			return sw.Data(ec)
		})
		if err == nil {
			err = sw.End(sent, nil)
		}
		rep.Payload += sw.Bytes
		return err
	})
	_, err := c.Upload(ctx, id, body)
	if err != nil {
		cancel()
	}
	// The server's answer says most; else the stream's own error (a read of
	// the top that failed) says more than the transport's.
	var ae *APIError
	if ferr := body.Finish(); err != nil && !errors.As(err, &ae) && ferr != nil &&
		!errors.Is(ferr, proto.ErrBodyNotRun) && !errors.Is(ferr, context.Canceled) {
		err = ferr
	}
	rep.Sent += sent
	return err
}

// readMissingClusters reads the clusters of miss from the tops, in order, joining
// runs of neighbours into larger reads.
func readMissingClusters(ctx context.Context, imgs map[byte]disk.Image, sizes map[byte]int, miss []proto.MissingItem,
	submit func(byte, int64, []byte, *proto.Digest) error) error {
	const maxRun = 16
	largest := 0
	for _, cs := range sizes {
		largest = max(largest, cs)
	}
	buf := make([]byte, 0, maxRun*largest)
	for i := 0; i < len(miss); {
		if err := ctx.Err(); err != nil {
			return err
		}
		m := miss[i]
		cs := int64(sizes[m.Disk])
		img := imgs[m.Disk]
		j := i + 1
		for j < len(miss) && j-i < maxRun && miss[j].Disk == m.Disk && miss[j].Index == miss[j-1].Index+1 {
			j++
		}
		off := m.Index * cs
		n := min(int64(j-i)*cs, img.Size()-off)
		if n <= 0 {
			return fmt.Errorf("%w: cluster %d beyond the disk", proto.ErrStream, m.Index)
		}
		b := buf[:n]
		if _, err := img.ReadAt(b, off); err != nil && err != io.EOF {
			return err
		}
		for k := i; k < j; k++ {
			lo := int64(k-i) * cs
			// The digest is the one the scan computed from these bytes; the server
			// checks every cluster against it (a top that changed since fails
			// there).
			if err := submit(m.Disk, miss[k].Index, b[lo:min(lo+cs, n)], &miss[k].Digest); err != nil {
				return err
			}
		}
		i = j
	}
	return nil
}

// freeze makes each changed top the layer the server committed and starts a
// fresh top on it; an unchanged disk keeps its top. The top file itself becomes
// the layer (images.Store.Adopt, which checks its ID against the server's): nothing
// is copied. The local catalog records the version (numbered as on the server)
// before the tops move onto its layers; should that fail, the layers just made are
// removed again and the tops are as they were, for a rerun. A top the scan listed
// and that has not changed since is not read again: its list gives the ID.
func (l *Laptop) freeze(ctx context.Context, d *images.Desktop, co *Checkout, res *proto.CheckinResult, changes []diskChanges) error {
	v := proto.Version{N: res.Version, Created: l.now().UTC().Truncate(time.Second), Kind: images.VersionCheckin, Note: "check-in",
		Conflict: res.Conflict, System: co.Layers[proto.DiskSystem], User: co.Layers[proto.DiskUser]}
	if co.Pending != nil {
		v.Checkin = co.Pending.ID
	}
	if res.Conflict {
		v.Kind, v.Note = images.VersionConflict, "conflict"
	}
	move := map[string]string{}       // disk → layer its top moves onto
	var made []string                 // layers adopted by this run
	modes := map[string]os.FileMode{} // top → its mode before
	undo := func() {
		for _, id := range made {
			l.store.RemoveLayer(id)
		}
		for p, m := range modes {
			os.Chmod(p, m)
		}
	}
	for _, dn := range proto.DiskNames {
		rel := topRel(d, dn)
		want, ok := res.Layers[dn]
		if rel == "" || !ok {
			continue
		}
		path := l.store.Path(rel)
		has, backing, err := desktop.TopState(path)
		if err != nil {
			undo()
			return err
		}
		if backing == want && !has {
			state.SetLayer(&v, dn, want) // frozen already (a rerun)
			continue
		}
		if want == co.Layers[dn] {
			continue // unchanged disk
		}
		if fi, err := os.Stat(path); err == nil {
			modes[path] = fi.Mode().Perm()
		}
		aopts := images.AdoptOptions{WantID: want}
		for i := range changes {
			if ch := &changes[i]; ch.name == dn && ch.unchanged() {
				aopts.Sums = proto.EntrySums(proto.ListEntries(ch.list), ch.decl.Size, ch.decl.ClusterSize)
			}
		}
		lay, existed, err := state.AdoptTop(ctx, l.store, l.log, path, aopts)
		if errors.Is(err, images.ErrIDMismatch) {
			// The top changed after its list was made: it keeps everything, and the
			// next check-in sends the rest from the version just committed.
			l.log.Warn("top changed during the check-in; it stays as it is", "disk", dn, "err", err)
			continue
		}
		if err != nil {
			undo()
			return proto.NoSpace(fmt.Errorf("freeze the %s top: %w", dn, err))
		}
		if !existed {
			made = append(made, lay.ID)
		}
		state.SetLayer(&v, dn, want)
		move[dn] = want
	}
	if err := l.recordVersion(co.Desktop, v, false); err != nil {
		undo()
		return err
	}
	for _, dn := range proto.DiskNames {
		id, ok := move[dn]
		if !ok {
			continue
		}
		if err := desktop.ResetTop(l.store, topRel(d, dn), id, 0); err != nil {
			return err
		}
	}
	for _, dn := range proto.DiskNames {
		if _, ok := co.Layers[dn]; ok {
			co.Layers[dn] = state.LayerOf(&v, dn)
		}
	}
	return nil
}

// topRel is the store-relative path of a disk's top ("" for a desktop without
// that disk).
func topRel(d *images.Desktop, dn string) string {
	if dn == proto.DiskUser {
		return d.UserDisk
	}
	return d.SystemDisk
}

func trimLayerName(backingName string) string {
	return strings.TrimSuffix(filepath.Base(backingName), ".qcow2")
}
