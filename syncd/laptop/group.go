package laptop

import (
	"cmp"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"time"

	"github.com/cvd-project/cvd/clone"
	"github.com/cvd-project/cvd/desktop"
	"github.com/cvd-project/cvd/images"
	"github.com/cvd-project/cvd/syncd/proto"
	"github.com/cvd-project/cvd/vm"
)

// A device in a desktop's group. The active device holds the lease (a
// check-out) and pushes the desktop's changes. The others follow: Follow sets
// the desktop up on this store without a lease and, later, fetches the head as
// the device's policy covers it into the store while the desktop runs (a
// staged update: new sealed layers, nothing the running chain reads changes);
// ApplyStaged moves the tops onto it while the VM is down, at the desktop's
// next start. Open makes this device the active one; StepDown gives the role
// back and keeps the copy as a follower's.

// Staged is the head version a follower fetched while it ran another: it is
// applied at the desktop's next start.
type Staged struct {
	Version    int                 `json:"version"`
	Layers     map[string]string   `json:"layers"`
	BlankSizes map[string]int64    `json:"blank_sizes,omitempty"`
	Boot       *images.DesktopBoot `json:"boot,omitempty"`
	Fetched    time.Time           `json:"fetched"`
}

// localBoot identifies the local desktop's boot configuration.
func (l *Laptop) localBoot(name string) string {
	d, err := l.store.Desktop(name)
	if err != nil {
		return ""
	}
	return bootDigest(d.Boot)
}

// FollowOptions controls Follow.
type FollowOptions struct {
	// Apply applies a staged update at once when the desktop's VM is down.
	Apply bool
}

// FollowReport says what Follow did.
type FollowReport struct {
	Desktop string `json:"desktop"`
	Policy  string `json:"policy"`
	Head    int    `json:"head"`   // the server's head
	Runs    int    `json:"runs"`   // the version the local tops stand on
	Staged  int    `json:"staged"` // the version staged for the next start (0: none)
	// SetUp says the desktop was set up on this store; Applied that the
	// staged update was applied; Active that this device holds the role.
	SetUp   bool                `json:"set_up,omitempty"`
	Applied bool                `json:"applied,omitempty"`
	Active  bool                `json:"active,omitempty"`
	Variant *proto.VariantChain `json:"variant,omitempty"`
	// Pushed and Snapshot are the versions an inactive device's changes were
	// kept as before an update applied (its user disk pushed, the rest a
	// snapshot version); 0 for none.
	Pushed   int `json:"pushed,omitempty"`
	Snapshot int `json:"snapshot,omitempty"`
	// What moved: layers fetched and held, stream and cluster bytes.
	LayersFetched []string `json:"layers_fetched"`
	LayersHeld    []string `json:"layers_held"`
	Bytes         int64    `json:"bytes"`
	DataBytes     int64    `json:"data_bytes"`
	Took          float64  `json:"seconds"`
}

// Follow makes this store a follower of the desktop c serves: the first time,
// the head as the device's policy covers it is fetched and the desktop set up
// over fresh tops; later, a newer head is fetched and staged (applied at once
// with opts.Apply when the VM is down). The active device stages too: what
// inactive devices pushed of their user disks. The server is told what the
// device runs and has staged.
func (l *Laptop) Follow(ctx context.Context, c *Client, name string, opts FollowOptions) (*FollowReport, error) {
	start := time.Now()
	if err := images.CheckObjectName("desktop", name); err != nil {
		return nil, err
	}
	co, err := l.Checkout(name)
	if err != nil && !errors.Is(err, proto.ErrNotCheckedOut) {
		return nil, err
	}
	if co != nil && co.Offline {
		return nil, fmt.Errorf("desktop %s was imported from an offline bundle: it has no server to follow", name)
	}
	rep := &FollowReport{Desktop: name}
	if opts.Apply && co != nil && co.Follow && !l.running(ctx, name) {
		// The next start of an inactive device: what it may push goes first,
		// the rest of its changes is kept as a snapshot version, then the
		// tops move onto the head.
		if rep.Pushed, rep.Snapshot, err = l.syncUpInactive(ctx, name); err != nil {
			return nil, err
		}
		if co, err = l.Checkout(name); err != nil {
			return nil, err
		}
	}
	m, err := c.Manifest(ctx, name)
	if err != nil {
		return nil, err
	}
	if !hasDisk(m, proto.DiskSystem) && m.Policy != proto.PolicyUser {
		return nil, fmt.Errorf("desktop %s: the server's manifest has no system disk", name)
	}
	rep.Policy, rep.Head, rep.Variant, rep.Active = m.Policy, m.Version, m.Variant, co != nil && !co.Follow
	cr := &CheckoutReport{LayersFetched: []string{}, LayersHeld: []string{}}
	layers, blanks := manifestLayers(m)
	switch {
	case co == nil:
		if _, err := l.store.Desktop(name); err == nil {
			return nil, fmt.Errorf("desktop %s exists on this store without a check-out record (pulled by a host?): remove it first (cvd desktop rm %s)", name, name)
		}
		if err := l.fetchMissing(ctx, c, m, cr); err != nil {
			return nil, err
		}
		if err := l.fetchBoot(ctx, c, name, m.Boot); err != nil {
			return nil, err
		}
		co = &Checkout{Desktop: name, Server: c.URL(), Token: c.token, Follow: true, Policy: m.Policy, Variant: m.Variant,
			Version: m.Version, Layers: layers, BlankSizes: blanks, CheckedOut: l.now().UTC(), boot: m.Boot}
		if err := l.setupDesktop(ctx, co); err != nil {
			return nil, err
		}
		if err := l.putCheckout(co); err != nil {
			return nil, err
		}
		l.defineVM(ctx, name)
		rep.SetUp = true
	case maps.Equal(layers, co.Layers) && bootDigest(m.Boot) == l.localBoot(name):
		if co.Staged != nil { // the head is what runs (a rollback to it)
			co.Staged = nil
			if err := l.putCheckout(co); err != nil {
				return nil, err
			}
		}
	case co.Staged != nil && maps.Equal(layers, co.Staged.Layers) && bootDigest(m.Boot) == bootDigest(co.Staged.Boot):
		// Staged already.
	default:
		if err := l.fetchMissing(ctx, c, m, cr); err != nil {
			return nil, err
		}
		if err := l.fetchBoot(ctx, c, name, m.Boot); err != nil {
			return nil, err
		}
		co.Staged = &Staged{Version: m.Version, Layers: layers, BlankSizes: blanks, Boot: m.Boot, Fetched: l.now().UTC()}
		co.Policy, co.Variant = m.Policy, m.Variant
		if err := l.putCheckout(co); err != nil {
			return nil, err
		}
		l.log.Info("update staged", "desktop", name, "version", m.Version, "bytes", cr.Bytes)
	}
	rep.LayersFetched, rep.LayersHeld, rep.Bytes, rep.DataBytes = cr.LayersFetched, cr.LayersHeld, cr.Bytes, cr.DataBytes
	if opts.Apply && co.Staged != nil {
		applied, err := l.ApplyStaged(ctx, name)
		if err != nil && !errors.Is(err, proto.ErrInUse) {
			return nil, err
		}
		rep.Applied = applied
		if co, err = l.Checkout(name); err != nil {
			return nil, err
		}
	}
	rep.Runs = co.Version
	if co.Staged != nil {
		rep.Staged = co.Staged.Version
	}
	fetched := int64(-1)
	if len(cr.LayersFetched) > 0 {
		fetched = cr.Bytes
	}
	l.report(ctx, c, co, fetched)
	rep.Took = time.Since(start).Seconds()
	return rep, nil
}

// report tells the server what this device runs and has staged of co's
// desktop, and what its last update fetched (-1: nothing new); what cvd
// desktop devices shows. A failure is only logged.
func (l *Laptop) report(ctx context.Context, c *Client, co *Checkout, fetched int64) {
	rep := proto.DeviceReport{Runs: co.Version, Fetched: fetched}
	if cv, ok := l.opts.VM.(classVM); ok {
		if class, err := cv.HardwareClass(ctx); err == nil {
			rep.Class = class
		}
	}
	if co.Staged != nil {
		rep.Staged = co.Staged.Version
	}
	if err := c.Report(ctx, co.Desktop, rep); err != nil {
		l.log.Warn("report the device's state to the server", "desktop", co.Desktop, "err", err)
	}
}

func hasDisk(m *proto.Manifest, dn string) bool {
	for _, d := range m.Disks {
		if d.Name == dn {
			return true
		}
	}
	return false
}

// manifestLayers is the layer each of m's disks stands on ("" for a blank
// disk, with its size).
func manifestLayers(m *proto.Manifest) (map[string]string, map[string]int64) {
	layers, blanks := map[string]string{}, map[string]int64{}
	for _, dm := range m.Disks {
		layers[dm.Name] = dm.Top()
		if dm.Top() == "" {
			blanks[dm.Name] = dm.BlankSize
		}
	}
	return layers, blanks
}

// running reports whether the desktop's local VM runs.
func (l *Laptop) running(ctx context.Context, name string) bool {
	r, ok := l.opts.VM.(runningVM)
	return ok && r.Running(ctx, name)
}

// syncUpInactive keeps an inactive device's changes on the server before its
// tops move: the user disk's pushed, the system disk's (which it may not push)
// as a snapshot version. It returns those versions (0: nothing).
func (l *Laptop) syncUpInactive(ctx context.Context, name string) (pushed, snapshot int, err error) {
	d, err := l.store.Desktop(name)
	if err != nil {
		return 0, 0, err
	}
	for _, dn := range []string{proto.DiskUser, proto.DiskSystem} { // the user disk first: a snapshot takes every disk
		rel := topRel(d, dn)
		if rel == "" {
			continue
		}
		has, _, err := desktop.TopState(l.store.Path(rel))
		if err != nil || !has {
			if err != nil {
				return 0, 0, err
			}
			continue
		}
		ci, err := l.CheckIn(ctx, name, CheckinOptions{UserOnly: dn == proto.DiskUser, Snapshot: dn == proto.DiskSystem})
		if err != nil {
			return pushed, snapshot, fmt.Errorf("keep the %s disk's changes before the update: %w", dn, err)
		}
		if ci.NoChanges {
			continue
		}
		if dn == proto.DiskUser {
			pushed = ci.Version
		} else {
			snapshot = ci.Version
		}
	}
	return pushed, snapshot, nil
}

// ApplyStaged moves the desktop's tops onto the staged update, while its VM is
// down (proto.ErrInUse when it runs): the switch at the desktop's next start.
// A top holding changes is not moved (ErrLocalChanges): Follow with Apply
// keeps an inactive device's changes on the server first (the user disk's
// pushed, the system disk's a snapshot version); an active device checks in.
// applied is false when nothing was staged.
func (l *Laptop) ApplyStaged(ctx context.Context, name string) (applied bool, err error) {
	co, err := l.Checkout(name)
	if err != nil || co.Staged == nil {
		return false, err
	}
	if l.running(ctx, name) {
		return false, fmt.Errorf("desktop %s: %w: its VM is running: the staged version %d applies at its next start", name, proto.ErrInUse, co.Staged.Version)
	}
	d, err := l.store.Desktop(name)
	if err != nil {
		return false, err
	}
	if err := desktop.CheckNotInUse(l.store, d); err != nil {
		return false, err
	}
	st := co.Staged
	for _, dn := range proto.DiskNames {
		want, ok := st.Layers[dn]
		rel := topRel(d, dn)
		if !ok || rel == "" {
			continue
		}
		has, backing, err := desktop.TopState(l.store.Path(rel))
		if err != nil {
			return false, err
		}
		if !has || backing == want {
			continue
		}
		if dn == proto.DiskUser {
			return false, fmt.Errorf("desktop %s: %w on the user disk: push them first (cvd checkin %s --user-only); the staged version %d waits",
				name, proto.ErrLocalChanges, name, st.Version)
		}
		return false, fmt.Errorf("desktop %s: %w on the system disk, which an inactive device does not push: open the desktop here (cvd open %s) to keep them as a snapshot; the staged version %d waits",
			name, proto.ErrLocalChanges, name, st.Version)
	}
	v := proto.Version{N: st.Version, Created: l.now().UTC().Truncate(time.Second), System: st.Layers[proto.DiskSystem],
		User: st.Layers[proto.DiskUser], Kind: images.VersionImport, Note: "staged"}
	if err := l.recordVersion(name, v, false); err != nil {
		return false, err
	}
	for _, dn := range proto.DiskNames {
		want, ok := st.Layers[dn]
		rel := topRel(d, dn)
		if !ok || rel == "" {
			continue
		}
		if _, backing, err := desktop.TopState(l.store.Path(rel)); err != nil {
			return false, err
		} else if backing == want {
			continue
		}
		if err := desktop.ResetTop(l.store, rel, want, st.BlankSizes[dn]); err != nil {
			return false, proto.NoSpace(err)
		}
	}
	if err := l.recordBoot(name, st.Boot); err != nil {
		return false, err
	}
	co.Version, co.Layers, co.BlankSizes, co.Staged = st.Version, st.Layers, st.BlankSizes, nil
	if err := l.putCheckout(co); err != nil {
		return false, err
	}
	l.defineVM(ctx, name)
	l.log.Info("staged update applied", "desktop", name, "version", st.Version)
	return true, nil
}

// defineVM (re)defines the desktop's local VM over its tops, when there is a
// hypervisor; a failure is only logged.
func (l *Laptop) defineVM(ctx context.Context, name string) {
	if l.opts.VM == nil {
		return
	}
	if err := l.defineVMErr(ctx, name); err != nil {
		l.log.Warn("define the desktop in the local hypervisor", "desktop", name, "err", err)
	}
}

// defineVMErr defines the desktop's VM from its boot configuration with this
// device's identity (made, with its NoCloud seed, the first time). The boot
// configuration is applied to a VM defined already only when it changed
// since: otherwise the VM keeps its user's edits and only its disks follow.
func (l *Laptop) defineVMErr(ctx context.Context, name string) error {
	co, err := l.Checkout(name)
	if err != nil {
		return err
	}
	// The tops and the boot configuration: a streamed desktop's are in its
	// record (its tops stand on NBD exports), a local one's in the store.
	var sysTop, userTop string
	var boot *images.DesktopBoot
	if rec := co.Stream; rec != nil {
		sysTop, userTop, boot = rec.Disks[proto.DiskSystem].Top, rec.Disks[proto.DiskUser].Top, rec.Boot
	} else {
		d, err := l.store.Desktop(name)
		if err != nil {
			return err
		}
		if d.SystemDisk != "" {
			sysTop = l.store.Path(d.SystemDisk)
		}
		if d.UserDisk != "" {
			userTop = l.store.Path(d.UserDisk)
		}
		boot = d.Boot
	}
	if sysTop == "" {
		return nil // a user disk alone does not boot: no VM
	}
	if co.Identity == nil {
		ids, err := clone.NewIdentities([]string{name + "-" + deviceOf(co.Token)}, nil)
		if err != nil {
			return err
		}
		co.Identity = &ids[0]
		if err := l.putCheckout(co); err != nil {
			return err
		}
	}
	seed := l.seedPath(name)
	if _, err := os.Stat(seed); err != nil {
		if err := os.MkdirAll(filepath.Dir(seed), 0o755); err != nil {
			return err
		}
		if err := clone.WriteSeed(seed, filepath.Dir(seed), *co.Identity); err != nil {
			return err
		}
	}
	dv := vm.DesktopVM{Name: name, SystemTop: sysTop, UserTop: userTop, UUID: co.Identity.UUID, MAC: co.Identity.MAC,
		SeedISO: seed, SerialLog: filepath.Join(l.store.Dir(), vm.LogsDir, name+".serial.log"), VNCListen: l.opts.VNCListen}
	if b := boot; b != nil {
		dv.Cmdline, dv.MemoryMiB, dv.VCPUs, dv.NIC = b.Cmdline, b.MemoryMiB, b.VCPUs, b.NICs > 0
		if b.Kernel != "" {
			dv.Kernel = l.store.BootFile(b.Kernel)
		}
		if b.Initrd != "" {
			dv.Initrd = l.store.BootFile(b.Initrd)
		}
	}
	sum := bootDigest(boot)
	dv.ApplyBoot = sum != co.BootApplied
	if err := os.MkdirAll(filepath.Dir(dv.SerialLog), 0o755); err != nil {
		return err
	}
	if err := l.opts.VM.DefineDesktop(ctx, dv); err != nil {
		return err
	}
	if dv.ApplyBoot {
		co.BootApplied = sum
		return l.putCheckout(co)
	}
	return nil
}

// seedPath is the desktop's NoCloud seed on this device.
func (l *Laptop) seedPath(name string) string {
	return filepath.Join(l.st.Dir, "seeds", name+".iso")
}

// deviceOf is a short form of the device ID a token names, for host names.
func deviceOf(token string) string {
	id, _ := proto.TokenDevice(token)
	id = cmp.Or(id, "device")
	return id[:min(8, len(id))]
}

// bootDigest identifies a boot configuration.
func bootDigest(b *images.DesktopBoot) string {
	j, _ := json.Marshal(b)
	h := sha256.Sum256(j)
	return hex.EncodeToString(h[:8])
}

// fetchBoot fetches the boot files of b the store lacks from the desktop's
// server, each checked against its SHA-256.
func (l *Laptop) fetchBoot(ctx context.Context, c *Client, name string, b *images.DesktopBoot) error {
	if b == nil {
		return nil
	}
	if err := images.CheckBoot(b); err != nil {
		return err
	}
	for _, f := range b.Files() {
		if l.store.HasBootFile(f) {
			continue
		}
		rc, err := c.BootFile(ctx, name, f)
		if err != nil {
			return fmt.Errorf("boot file %s: %w", f[:12], err)
		}
		_, err = l.store.AddBootFile(rc, f, images.MaxBootFile)
		rc.Close()
		if err != nil {
			return proto.NoSpace(fmt.Errorf("boot file %s: %w", f[:12], err))
		}
	}
	return nil
}

// StepDown gives the active role back: the lease is released and the copy
// stays as a follower's. Changes not pushed are refused (check in first).
func (l *Laptop) StepDown(ctx context.Context, name string) error {
	co, err := l.Checkout(name)
	if err != nil {
		return err
	}
	if co.Follow {
		return nil
	}
	if co.Offline {
		return fmt.Errorf("desktop %s was imported from an offline bundle: it has no server to follow", name)
	}
	d, err := l.store.Desktop(name)
	if err != nil {
		return err
	}
	for _, dn := range proto.DiskNames {
		if rel := topRel(d, dn); rel != "" {
			if has, _, err := desktop.TopState(l.store.Path(rel)); err != nil {
				return err
			} else if has {
				return fmt.Errorf("desktop %s: %w on the %s disk: check them in first", name, proto.ErrLocalChanges, dn)
			}
		}
	}
	c, err := NewClient(co.Server, co.Token, ClientOptions{CACert: co.CACert, Pin: co.Pin})
	if err != nil {
		return err
	}
	if err := c.Release(ctx, name, co.Lease.ID); err != nil && !errors.Is(err, proto.ErrNoLease) && !errors.Is(err, proto.ErrLeaseExpired) {
		return err
	}
	co.Follow, co.Lease = true, proto.Lease{}
	return l.putCheckout(co)
}

// OpenOptions controls Open.
type OpenOptions struct {
	// Wait is how long the active device has to sync up and step down before
	// its lease is broken (its later check-in then becomes a conflict
	// version); Poll how often the server is asked meanwhile (default 1 s).
	Wait, Poll time.Duration
	// Force skips the server's minimum interval between changes of the role.
	Force bool
	TTL   time.Duration
	// Start starts the desktop's local VM once this device is active.
	Start bool
}

// starterVM is the optional capability of a LocalVM to start a desktop's VM.
type starterVM interface {
	StartDesktop(ctx context.Context, desktop string) error
}

// OpenReport says what Open did.
type OpenReport struct {
	Desktop string `json:"desktop"`
	// Snapshot is the version this device's state was kept as before it
	// became active (0: it had no changes); Previous the device that was
	// active, Broken whether its lease was broken after the wait.
	Snapshot      int             `json:"snapshot,omitempty"`
	Previous      string          `json:"previous,omitempty"`
	Broken        bool            `json:"broken,omitempty"`
	AlreadyActive bool            `json:"already_active,omitempty"`
	Applied       bool            `json:"applied,omitempty"` // a staged update applied (on the active device)
	Started       bool            `json:"started,omitempty"` // the local VM was started
	Waited        float64         `json:"waited_seconds"`
	Checkout      *CheckoutReport `json:"checkout,omitempty"`
}

// Open makes this device the desktop's active one: its state is first kept as
// a snapshot version on the server (when its tops hold changes), then the
// active device is asked to sync up and step down (waiting up to opts.Wait),
// then this device checks the head out. On the active device it applies a
// staged update.
func (l *Laptop) Open(ctx context.Context, c *Client, name string, opts OpenOptions) (*OpenReport, error) {
	rep := &OpenReport{Desktop: name}
	co, err := l.Checkout(name)
	if err != nil && !errors.Is(err, proto.ErrNotCheckedOut) {
		return nil, err
	}
	if co != nil && !co.Follow && !co.expired(l.now()) {
		rep.AlreadyActive = true
		if rep.Applied, err = l.ApplyStaged(ctx, name); err != nil {
			return nil, err
		}
		return rep, l.startVM(ctx, name, opts, rep)
	}
	// May the role change now? (Asking changes nothing yet.)
	if _, err := c.Open(ctx, name, proto.OpenRequest{WaitSeconds: int64(opts.Wait / time.Second), Force: opts.Force, Check: true}); err != nil {
		return nil, err
	}
	if co != nil && co.Follow {
		ci, err := l.CheckIn(ctx, name, CheckinOptions{Snapshot: true})
		if err != nil {
			return nil, fmt.Errorf("snapshot before opening: %w", err)
		}
		if !ci.NoChanges {
			rep.Snapshot = ci.Version
		}
	}
	poll := cmp.Or(opts.Poll, time.Second)
	t0 := time.Now()
	for {
		ans, err := c.Open(ctx, name, proto.OpenRequest{WaitSeconds: int64(opts.Wait / time.Second), Force: opts.Force})
		if err != nil {
			return nil, err
		}
		if ans.Holder != "" {
			rep.Previous = ans.Holder
		}
		rep.Broken = rep.Broken || ans.Broken
		if ans.State == "free" {
			break
		}
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(poll):
		}
	}
	rep.Waited = time.Since(t0).Seconds()
	if rep.Checkout, err = l.CheckOut(ctx, c, name, CheckoutOptions{TTL: opts.TTL}); err != nil {
		return nil, err
	}
	return rep, l.startVM(ctx, name, opts, rep)
}

// startVM starts the desktop's local VM when opts ask for it.
func (l *Laptop) startVM(ctx context.Context, name string, opts OpenOptions, rep *OpenReport) error {
	if !opts.Start {
		return nil
	}
	s, ok := l.opts.VM.(starterVM)
	if !ok {
		return fmt.Errorf("desktop %s is active here, but there is no hypervisor to start it on", name)
	}
	if err := s.StartDesktop(ctx, name); err != nil {
		return fmt.Errorf("desktop %s is active here; start its VM: %w", name, err)
	}
	rep.Started = true
	return nil
}

// HandOver is the active device's answer to another device that asked for the
// role: when the server says one did (on this device's lease), the desktop's
// changes are checked in and the role given back (StepDown). asked is false
// when nobody asked. A running VM keeps the role here: the other device's
// wait then runs out and this device's later check-in becomes a conflict
// version.
func (l *Laptop) HandOver(ctx context.Context, name string) (asked bool, to string, err error) {
	co, err := l.Checkout(name)
	if err != nil || co.Follow || co.Offline {
		return false, "", err
	}
	c, err := NewClient(co.Server, co.Token, ClientOptions{CACert: co.CACert, Pin: co.Pin})
	if err != nil {
		return false, "", err
	}
	st, err := c.Desktop(ctx, name)
	if err != nil {
		return false, "", err
	}
	if st.Lease == nil || st.Lease.ID != co.Lease.ID || st.Lease.HandoverTo == "" {
		return false, "", nil
	}
	to = st.Lease.HandoverTo
	if _, err := l.CheckIn(ctx, name, CheckinOptions{}); err != nil {
		return true, to, fmt.Errorf("sync up before handing over to %s: %w", to, err)
	}
	if err := l.StepDown(ctx, name); err != nil {
		return true, to, err
	}
	l.log.Info("handed the active role over", "desktop", name, "to", to)
	return true, to, nil
}

// RemoteOptions controls OpenRemote.
type RemoteOptions struct {
	// On names the device to run the desktop ("": the group's one host).
	On string
	// Wait is what the device asked has to make the active device step down;
	// ConsoleWait how long to wait for its console address; Poll how often to
	// ask (default 1 s).
	Wait, ConsoleWait, Poll time.Duration
}

// RemoteReport says what OpenRemote did.
type RemoteReport struct {
	Desktop string `json:"desktop"`
	Device  string `json:"device"`
	Console string `json:"console"`
	// SyncedUp is the version this device's changes were pushed as (0: none);
	// SteppedDown whether it gave the active role back.
	SyncedUp    int     `json:"synced_up,omitempty"`
	SteppedDown bool    `json:"stepped_down,omitempty"`
	Waited      float64 `json:"waited_seconds"`
}

// OpenRemote runs the desktop on another device of its group (the
// data-center host): this device syncs up (an active one checks in and steps
// down; an inactive one pushes its user disk), then asks the server that the
// other device open it; that device's agent does, starts its VM and reports
// its console address, which this call waits for.
func (l *Laptop) OpenRemote(ctx context.Context, c *Client, name string, opts RemoteOptions) (*RemoteReport, error) {
	rep := &RemoteReport{Desktop: name}
	if co, err := l.Checkout(name); err == nil {
		ci, err := l.CheckIn(ctx, name, CheckinOptions{UserOnly: co.Follow})
		if err != nil {
			return nil, fmt.Errorf("sync up before the desktop runs elsewhere: %w", err)
		}
		if !ci.NoChanges {
			rep.SyncedUp = ci.Version
		}
		if !co.Follow {
			if err := l.StepDown(ctx, name); err != nil {
				return nil, err
			}
			rep.SteppedDown = true
		}
	} else if !errors.Is(err, proto.ErrNotCheckedOut) {
		return nil, err
	}
	t0 := time.Now()
	ans, err := c.Open(ctx, name, proto.OpenRequest{On: opts.On, Remote: opts.On == "", WaitSeconds: int64(opts.Wait / time.Second)})
	if err != nil {
		return nil, err
	}
	rep.Device = ans.Holder
	deadline := time.Now().Add(opts.Wait + cmp.Or(opts.ConsoleWait, 2*time.Minute))
	for {
		st, err := c.Desktop(ctx, name)
		if err != nil {
			return nil, err
		}
		if r := st.Remote; r != nil && r.Device == rep.Device && !r.Opened.IsZero() && !r.Opened.Before(r.Requested) {
			if r.Error != "" {
				return nil, fmt.Errorf("desktop %s: device %s could not run it: %s", name, r.Device, r.Error)
			}
			rep.Console, rep.Waited = r.Console, time.Since(t0).Seconds()
			return rep, nil
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("desktop %s: device %s did not report a console within %v (is its agent running?)", name, rep.Device, time.Since(t0).Round(time.Second))
		}
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(cmp.Or(opts.Poll, time.Second)):
		}
	}
}

// classVM is the optional capability of a LocalVM to detect this device's
// hardware class from its hypervisor.
type classVM interface {
	HardwareClass(ctx context.Context) (string, error)
}

// displayVM is the optional capability of a LocalVM to give a running
// desktop's console address.
type displayVM interface {
	Display(ctx context.Context, desktop string) (string, error)
}

// RunRequested opens the desktop and starts its VM here when the server says
// this device was asked to run it (OpenRemote elsewhere), and reports its
// console address (or the failure) back. asked is false when it was not.
func (l *Laptop) RunRequested(ctx context.Context, c *Client, co *Checkout) (asked bool, console string, err error) {
	st, err := c.Desktop(ctx, co.Desktop)
	if err != nil {
		return false, "", err
	}
	r := st.Remote
	if id, _ := proto.TokenDevice(co.Token); r == nil || r.DeviceID != id || !r.Opened.IsZero() {
		return false, "", nil
	}
	console, err = l.runHere(ctx, c, co.Desktop, time.Duration(r.WaitSeconds)*time.Second)
	rep := proto.ConsoleReport{Console: console}
	if err != nil {
		rep.Error = err.Error()
	}
	if rerr := c.Console(ctx, co.Desktop, rep); rerr != nil && err == nil {
		err = rerr
	}
	return true, console, err
}

func (l *Laptop) runHere(ctx context.Context, c *Client, name string, wait time.Duration) (string, error) {
	if _, err := l.Open(ctx, c, name, OpenOptions{Wait: wait, Force: true, Start: true, Poll: 200 * time.Millisecond}); err != nil {
		return "", err
	}
	d, ok := l.opts.VM.(displayVM)
	if !ok {
		return "", fmt.Errorf("no hypervisor to give the console of %s", name)
	}
	return d.Display(ctx, name)
}
