package laptop

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/cvd-project/cvd/disk"
	"github.com/cvd-project/cvd/syncd/state"

	"github.com/cvd-project/cvd/desktop"
	"github.com/cvd-project/cvd/images"
	"github.com/cvd-project/cvd/syncd/proto"
)

// CheckoutOptions controls a check-out.
type CheckoutOptions struct {
	// TTL asks for a lease length; 0 takes the server's default.
	TTL time.Duration
	// CACert is remembered with the record, for later check-ins.
	CACert string
	// Encrypt asks for an encrypted copy (the server may encrypt every copy
	// in any case): every layer and top the laptop writes is LUKS qcow2 under
	// the copy's key.
	Encrypt bool
}

// CheckoutReport says what a check-out did.
type CheckoutReport struct {
	Desktop       string      `json:"desktop"`
	Server        string      `json:"server"`
	Version       int         `json:"version"`
	Lease         proto.Lease `json:"lease"`
	LayersFetched []string    `json:"layers_fetched"`
	LayersHeld    []string    `json:"layers_held"` // already in the local store
	Bytes         int64       `json:"bytes"`       // cluster stream bytes received
	DataBytes     int64       `json:"data_bytes"`  // cluster bytes those streams carried
	// ClustersByRef came as references to layers the laptop held already.
	ClustersByRef int64     `json:"clusters_by_reference"`
	Sealed        int       `json:"sealed,omitempty"`
	VMStopped     bool      `json:"vm_stopped,omitempty"`
	Resumed       bool      `json:"resumed,omitempty"`
	Took          float64   `json:"seconds"`
	Finished      time.Time `json:"finished"`
}

// CheckOut checks desktop out from the server c talks to: it takes the lease,
// fetches the layers the store lacks, and sets the desktop up over fresh tops. A
// rerun after an interruption fetches only what is still missing.
func (l *Laptop) CheckOut(ctx context.Context, c *Client, name string, opts CheckoutOptions) (*CheckoutReport, error) {
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
	if prev != nil && prev.Stream != nil {
		return nil, fmt.Errorf("desktop %s is streamed on this store: pin it (`cvd pin %s`) and let it switch to local files, or remove it (`cvd release %s --discard`)", name, name, name)
	}
	if prev != nil && prev.Pending != nil {
		return nil, fmt.Errorf("desktop %s: %w: a check-in is under way; run `cvd checkin %s` first", name, proto.ErrLocalChanges, name)
	}
	// Local tops holding changes of another version must be checked in first.
	if d, err := l.store.Desktop(name); err == nil {
		for _, rel := range []string{d.SystemDisk, d.UserDisk} {
			if rel == "" {
				continue
			}
			has, _, err := desktop.TopState(l.store.Path(rel))
			if err != nil {
				return nil, err
			}
			if has {
				return nil, fmt.Errorf("desktop %s: %w: check it in first (`cvd checkin %s`)", name, proto.ErrLocalChanges, name)
			}
		}
	} else if !errors.Is(err, images.ErrNotFound) {
		return nil, err
	}

	m, err := l.takeLease(ctx, c, name, opts.TTL, false, opts.Encrypt)
	if err != nil {
		return nil, err
	}
	if opts.Encrypt && m.Key == nil {
		return nil, fmt.Errorf("desktop %s: the server sent no key for an encrypted copy", name)
	}
	if m.Key != nil {
		if err := l.storeLeaseKey(name, m.Lease, m.Key); err != nil {
			return nil, err
		}
	}
	rep := &CheckoutReport{Desktop: name, Server: c.URL(), Version: m.Version, Lease: m.Lease, Sealed: m.Sealed,
		VMStopped: m.VMStopped, LayersFetched: []string{}, LayersHeld: []string{}}
	fresh := prev == nil || prev.Lease.ID != m.Lease.ID
	rep.Resumed = !fresh
	fail := func(err error) (*CheckoutReport, error) {
		// A lease this call took and could not use goes back, so that a refused
		// check-out (a full disk, a tampered stream) leaves the server as it was.
		if fresh && m.Lease.Granted.After(start.Add(-time.Minute)) && m.Lease.ID != "" {
			rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
			if rerr := c.Release(rctx, name, m.Lease.ID); rerr != nil {
				l.log.Warn("release the lease after a failed check-out", "err", rerr)
			}
			cancel()
		}
		return nil, err
	}

	if err := l.fetchMissing(ctx, c, m, rep); err != nil {
		return fail(err)
	}
	if err := l.fetchBoot(ctx, c, name, m.Boot); err != nil {
		return fail(err)
	}

	// The desktop over fresh tops on the manifest's layers.
	pin := c.PeerPin()
	if prev != nil && prev.Pin != "" {
		pin = prev.Pin
	}
	co := &Checkout{Desktop: name, Server: c.URL(), Token: c.token, CACert: opts.CACert, Pin: pin, Lease: m.Lease,
		Version: m.Version, Layers: map[string]string{}, BlankSizes: map[string]int64{}, CheckedOut: l.now().UTC(),
		Policy: m.Policy, Variant: m.Variant, boot: m.Boot}
	if prev != nil {
		co.Identity, co.BootApplied = prev.Identity, prev.BootApplied
	}
	if prev != nil && !fresh {
		co.CheckedOut = prev.CheckedOut
	}
	for _, dm := range m.Disks {
		co.Layers[dm.Name] = dm.Top()
		if dm.Top() == "" {
			co.BlankSizes[dm.Name] = dm.BlankSize
		}
	}
	if err := l.setupDesktop(ctx, co); err != nil {
		return fail(err)
	}
	if err := l.putCheckout(co); err != nil {
		return fail(err)
	}
	l.report(ctx, c, co, rep.Bytes)
	l.defineVM(ctx, name)
	rep.Took = time.Since(start).Seconds()
	rep.Finished = l.now().UTC()
	return rep, nil
}

// takeLease asks the server for the desktop's lease and manifest, saying which
// layers the store holds (the streams may refer to them).
func (l *Laptop) takeLease(ctx context.Context, c *Client, name string, ttl time.Duration, stream, encrypt bool) (*proto.Manifest, error) {
	var have []string
	if ls, err := l.store.Layers(); err == nil {
		for _, ly := range ls {
			have = append(have, ly.ID)
		}
	}
	if len(have) > proto.MaxHave {
		have = have[len(have)-proto.MaxHave:]
	}
	return c.CheckoutWith(ctx, name, proto.CheckoutRequest{TTLSeconds: int64(ttl / time.Second), Have: have, Stream: stream, Encrypt: encrypt})
}

// fetchMissing fetches the layers of m's disks that the store lacks, parents
// first, with m's lease ("" for none), and imports them; rep counts what moved.
func (l *Laptop) fetchMissing(ctx context.Context, c *Client, m *proto.Manifest, rep *CheckoutReport) error {
	// Which layers are missing, bottom up, and is there room for them?
	var need []proto.LayerInfo
	var needBytes, largest int64
	seen := map[string]bool{}
	for _, dm := range m.Disks {
		for i := len(dm.Layers) - 1; i >= 0; i-- {
			li := dm.Layers[i]
			if seen[li.ID] {
				continue
			}
			seen[li.ID] = true
			if _, err := l.store.Layer(li.ID); err == nil {
				rep.LayersHeld = append(rep.LayersHeld, li.ID)
				continue
			}
			need = append(need, li)
			needBytes += li.DataBytes
			largest = max(largest, li.DataBytes)
		}
	}
	if err := state.CheckFree(l.store.Dir(), needBytes+largest+16<<20); err != nil {
		return err
	}
	// Layers are fetched one after the other, parents first; each is imported
	// into the store (a copy, in order: a layer needs its parent there) while the
	// next one arrives.
	imports := make(chan *layerFetcher, len(need))
	importErr := make(chan error, 1)
	var pending sync.WaitGroup
	var importFailed atomic.Bool
	go func() {
		var err error
		for f := range imports {
			if err == nil {
				if err = f.finish(ctx); err != nil {
					err = fmt.Errorf("import layer %s: %w", state.Short(f.info.ID), err)
					importFailed.Store(true)
				}
			}
			pending.Done()
		}
		importErr <- err
	}()
	refs := newLocalRefs(l.store)
	defer refs.close()
	var enc *disk.Encryption
	if m.Key != nil {
		kek, err := l.copyKey(m.Desktop)
		if err != nil {
			return err
		}
		if kek == nil {
			return fmt.Errorf("desktop %s: the copy's key is not kept here", m.Desktop)
		}
		enc = &disk.Encryption{Key: kek}
	}
	var fetchErr error
	for _, li := range need {
		if li.NeedsParent() {
			pending.Wait() // its zero clusters are written over the parent
		}
		if importFailed.Load() {
			break
		}
		l.opts.Progress.Start("layer "+state.Short(li.ID), li.DataBytes)
		f, n, err := l.fetchLayer(ctx, c, li, m.Lease.ID, refs, enc)
		l.opts.Progress.Done()
		rep.Bytes += n
		if err != nil {
			fetchErr = fmt.Errorf("fetch layer %s: %w", state.Short(li.ID), err)
			break
		}
		rep.ClustersByRef += f.byRef
		pending.Add(1)
		imports <- f
		rep.DataBytes += li.DataBytes
		rep.LayersFetched = append(rep.LayersFetched, li.ID)
	}
	close(imports)
	if err := <-importErr; fetchErr == nil {
		fetchErr = err
	}
	return fetchErr
}

// setupDesktop makes the local desktop stand on co's layers: created the first
// time, its (empty) tops replaced afterwards. Its history in the local catalog
// mirrors the server's version numbers: the version it stands on is its head.
func (l *Laptop) setupDesktop(ctx context.Context, co *Checkout) error {
	sys := co.Layers[proto.DiskSystem]
	_, hasUser := co.Layers[proto.DiskUser]
	userOnly := co.Policy == proto.PolicyUser
	if sys == "" && !userOnly {
		return fmt.Errorf("desktop %s: the manifest has no system disk", co.Desktop)
	}
	v := proto.Version{N: co.Version, Created: l.now().UTC().Truncate(time.Second), System: sys, User: co.Layers[proto.DiskUser],
		Kind: images.VersionImport, Note: "check-out"}
	if co.Offline {
		v.Note = "import"
	} else if co.pulled {
		v.Note = "pull"
	}
	d, err := l.store.Desktop(co.Desktop)
	if errors.Is(err, images.ErrNotFound) {
		spec := images.DesktopSpec{Apps: []string{sys}}
		if userOnly {
			spec = images.DesktopSpec{UserOnly: true}
		}
		if hasUser {
			spec.User = co.Layers[proto.DiskUser]
			if spec.User == "" {
				spec.UserSize = co.BlankSizes[proto.DiskUser]
			}
		}
		if _, err := desktop.Create(ctx, l.store, co.Desktop, spec); err != nil {
			return proto.NoSpace(err)
		}
		if err := l.recordVersion(co.Desktop, v, true); err != nil {
			return err
		}
		return l.recordBoot(co.Desktop, co.boot)
	}
	if err != nil {
		return err
	}
	// The layers are referenced before the tops stand on them.
	if err := l.recordVersion(co.Desktop, v, false); err != nil {
		return err
	}
	for _, dn := range proto.DiskNames {
		rel := d.SystemDisk
		if dn == proto.DiskUser {
			rel = d.UserDisk
		}
		_, want := co.Layers[dn]
		if rel == "" {
			if want {
				return fmt.Errorf("desktop %s exists here without a %s disk; remove it (`cvd desktop rm %s`) and check it out again", co.Desktop, dn, co.Desktop)
			}
			continue
		}
		has, backing, err := desktop.TopState(l.store.Path(rel))
		if err != nil {
			return err
		}
		if backing == co.Layers[dn] && !has {
			continue
		}
		if has {
			return fmt.Errorf("desktop %s: %w on the %s disk", co.Desktop, proto.ErrLocalChanges, dn)
		}
		if err := desktop.ResetTop(l.store, rel, co.Layers[dn], co.BlankSizes[dn]); err != nil {
			return err
		}
	}
	return l.recordBoot(co.Desktop, co.boot)
}

// recordBoot makes b the local desktop's boot configuration (when it changed).
func (l *Laptop) recordBoot(name string, b *images.DesktopBoot) error {
	d, err := l.store.Desktop(name)
	if err != nil {
		return err
	}
	if bootDigest(d.Boot) == bootDigest(b) {
		return nil
	}
	_, err = l.store.SetDesktopBoot(name, b)
	return proto.NoSpace(err)
}

// recordVersion makes v (numbered as on the server) the local desktop's head
// (desktop.RecordVersion).
func (l *Laptop) recordVersion(name string, v proto.Version, fresh bool) error {
	return proto.NoSpace(desktop.RecordVersion(l.store, name, v, fresh))
}

// Pull makes the store hold the desktop's head version as the server has it,
// for a hypervisor host that provisions clones of it: the layers the store
// lacks are fetched by ID, without a lease (sealed layers never change), and a
// local desktop stands on the head's layers (created the first time, moved to
// a newer head later). A second pull of the same head moves no layer bytes. A
// desktop checked out on this store is refused: it has a lease of its own.
func (l *Laptop) Pull(ctx context.Context, c *Client, name string) (*CheckoutReport, error) {
	start := time.Now()
	if err := images.CheckObjectName("desktop", name); err != nil {
		return nil, err
	}
	if _, err := l.Checkout(name); err == nil {
		return nil, fmt.Errorf("desktop %s is checked out on this store: %w", name, proto.ErrLocalChanges)
	} else if !errors.Is(err, proto.ErrNotCheckedOut) {
		return nil, err
	}
	m, err := c.Manifest(ctx, name)
	if err != nil {
		return nil, err
	}
	rep := &CheckoutReport{Desktop: name, Server: c.URL(), Version: m.Version, LayersFetched: []string{}, LayersHeld: []string{}}
	if err := l.fetchMissing(ctx, c, m, rep); err != nil {
		return nil, err
	}
	if err := l.fetchBoot(ctx, c, name, m.Boot); err != nil {
		return nil, err
	}
	co := &Checkout{Desktop: name, Version: m.Version, Layers: map[string]string{}, BlankSizes: map[string]int64{}, pulled: true, boot: m.Boot}
	for _, dm := range m.Disks {
		co.Layers[dm.Name] = dm.Top()
		if dm.Top() == "" {
			co.BlankSizes[dm.Name] = dm.BlankSize
		}
	}
	if err := l.setupDesktop(ctx, co); err != nil {
		return nil, err
	}
	rep.Took = time.Since(start).Seconds()
	rep.Finished = l.now().UTC()
	return rep, nil
}
