package laptop

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"time"

	"github.com/cvd-project/cvd/syncd/state"

	"github.com/cvd-project/cvd/catalog"
	"github.com/cvd-project/cvd/clone"
	"github.com/cvd-project/cvd/disk"
	"github.com/cvd-project/cvd/images"
	"github.com/cvd-project/cvd/syncd/proto"
	"github.com/cvd-project/cvd/vm"
)

// Checkout is a laptop's record of a checked-out desktop.
type Checkout struct {
	Desktop string `json:"desktop"`
	Server  string `json:"server"`
	Token   string `json:"token"` // the device token (the state file is mode 0600)
	CACert  string `json:"ca_cert,omitempty"`
	// Pin is the https server's certificate key (hex SHA-256 of its
	// SubjectPublicKeyInfo) seen at the check-out: later requests refuse another.
	Pin   string      `json:"pin,omitempty"`
	Lease proto.Lease `json:"lease"`
	// Version is the server version the local tops stand on; Layers the layer
	// each disk's top stands on ("" for a blank disk).
	Version     int               `json:"version"`
	Layers      map[string]string `json:"layers"`
	BlankSizes  map[string]int64  `json:"blank_sizes,omitempty"`
	CheckedOut  time.Time         `json:"checked_out"`
	LastCheckin time.Time         `json:"last_checkin,omitzero"`
	LastRenew   time.Time         `json:"last_renew,omitzero"`
	// Pending is a check-in under way (its server-side ID), and its result once
	// the server committed it but the laptop has not frozen its tops yet.
	Pending *PendingCheckin `json:"pending,omitempty"`
	// Offline marks a copy imported from a bundle: no server to renew with.
	Offline bool `json:"offline,omitempty"`
	// Follow marks the copy of an inactive device of the desktop's group: it
	// holds no lease, stages the head as its Policy covers it (Staged, applied
	// at the desktop's next start) and pushes its user disk alone. Variant is
	// the base variant its system disk stands on under the apps policy.
	Follow  bool                `json:"follow,omitempty"`
	Policy  string              `json:"policy,omitempty"`
	Variant *proto.VariantChain `json:"variant,omitempty"`
	Staged  *Staged             `json:"staged,omitempty"`
	// Identity is this device's machine identity for the desktop's VM (never
	// synced); BootApplied the boot configuration its VM was last defined
	// from (a digest).
	Identity    *clone.Identity `json:"identity,omitempty"`
	BootApplied string          `json:"boot_applied,omitempty"`
	// Stream marks a streamed check-out that has not switched to local files
	// yet: its tops stand on NBD exports a stream process serves.
	Stream *StreamRecord `json:"stream,omitempty"`
	// pulled marks a desktop a host pulled (never recorded: a host keeps no
	// check-out).
	pulled bool
	// boot is the desktop's boot configuration setupDesktop records (its
	// files fetched already).
	boot *images.DesktopBoot
}

// expired reports whether the copy's lease has expired (a follower's copy
// holds none: it never expires).
func (c *Checkout) expired(now time.Time) bool { return !c.Follow && c.Lease.Expired(now) }

// PendingCheckin is a check-in that a rerun resumes.
type PendingCheckin struct {
	ID      string               `json:"id"`
	Base    int                  `json:"base"`
	Release bool                 `json:"release,omitempty"`
	Result  *proto.CheckinResult `json:"result,omitempty"`
}

// Progress shows a transfer; the CLI draws a bar on a terminal. Bytes are payload
// bytes (as sent or received).
type Progress interface {
	Start(what string, total int64)
	Add(n int64)
	Done()
}

type noProgress struct{}

func (noProgress) Start(string, int64) {}
func (noProgress) Add(int64)           {}
func (noProgress) Done()               {}

// LaptopOptions controls a Laptop.
type LaptopOptions struct {
	Progress Progress
	Logger   *slog.Logger
	Now      func() time.Time
	// VM defines the checked-out desktop in the local hypervisor; nil skips it.
	VM LocalVM
	// VNCListen gives the desktop's VMs a VNC console on that address (a
	// data-center host's): "" for none.
	VNCListen string
}

// LocalVM defines a checked-out desktop on the laptop (the CLI wires it to
// package hypervisor when libvirt is present).
type LocalVM interface {
	// DefineDesktop defines (or redefines) the desktop's VM over its local
	// tops, from the desktop's boot configuration and this device's identity.
	DefineDesktop(ctx context.Context, d vm.DesktopVM) error
	// UndefineDesktop removes it (after a purge or a release).
	UndefineDesktop(ctx context.Context, desktop string) error
}

// runningVM is the optional capability of a LocalVM to tell whether the desktop's
// VM runs: a running desktop is not checked in (its tops are being written).
type runningVM interface {
	Running(ctx context.Context, desktop string) bool
}

// Laptop is the client side over a local store: check-out, check-in, renew,
// release, purge.
type Laptop struct {
	store *images.Store
	st    *state.State
	opts  LaptopOptions
	log   *slog.Logger
	clock *clock
	// dropKeyring takes the copies' keys out of the process's keyring.
	dropKeyring func()
}

// OpenLaptop opens syncd's state in a local store.
func OpenLaptop(store *images.Store, opts LaptopOptions) (*Laptop, error) {
	if opts.Progress == nil {
		opts.Progress = noProgress{}
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	st, err := state.Open(store)
	if err != nil {
		return nil, err
	}
	l := &Laptop{store: store, st: st, opts: opts, log: log, clock: newClock(st.Dir)}
	l.dropKeyring = disk.AddKeyring(l.liveKeys)
	store.SetTopEncryption(l.topEncryption)
	return l, nil
}

// Close closes syncd's state (not the store).
func (l *Laptop) Close() error {
	l.dropKeyring()
	return l.st.Close()
}

// now is the laptop's clock: never before the latest time it saw.
func (l *Laptop) now() time.Time { return l.clock.now(l.opts.Now()) }

// Checkouts lists the desktops checked out to this store.
func (l *Laptop) Checkouts() ([]Checkout, error) {
	var out []Checkout
	err := l.st.View(func(tx *catalog.Tx) error {
		return tx.Bucket(state.BucketCheckouts).ForEach(func(k, v []byte) error {
			var c Checkout
			if _, err := state.GetJSON(tx, state.BucketCheckouts, string(k), &c); err != nil {
				return err
			}
			out = append(out, c)
			return nil
		})
	})
	return out, err
}

// Checkout returns the record of a checked-out desktop.
func (l *Laptop) Checkout(name string) (*Checkout, error) {
	var c Checkout
	var ok bool
	err := l.st.View(func(tx *catalog.Tx) error {
		var err error
		ok, err = state.GetJSON(tx, state.BucketCheckouts, name, &c)
		return err
	})
	if err != nil {
		return nil, err
	}
	if !ok {
		return nil, fmt.Errorf("desktop %s: %w", name, proto.ErrNotCheckedOut)
	}
	return &c, nil
}

func (l *Laptop) putCheckout(c *Checkout) error {
	return l.st.Update(func(tx *catalog.Tx) error { return state.PutJSON(tx, state.BucketCheckouts, c.Desktop, c) })
}

// PurgeReport says what a purge removed.
type PurgeReport struct {
	Desktop string    `json:"desktop"`
	Expired time.Time `json:"expired"`
	Reason  string    `json:"reason"`
}

// PurgeExpired removes every checked-out copy whose lease has expired, whether
// or not the server can be reached: the desktop, its tops (changes not checked in
// are lost, by policy) and its record. The store's gc removes the layers nothing
// else keeps.
func (l *Laptop) PurgeExpired(ctx context.Context) ([]PurgeReport, error) {
	cos, err := l.Checkouts()
	if err != nil {
		return nil, err
	}
	var out []PurgeReport
	for _, c := range cos {
		if !c.expired(l.now()) {
			continue
		}
		if err := l.removeCopy(ctx, &c); err != nil {
			return out, err
		}
		l.log.Warn("purged expired copy", "desktop", c.Desktop, "expired", c.Lease.Expires)
		out = append(out, PurgeReport{Desktop: c.Desktop, Expired: c.Lease.Expires, Reason: "lease expired"})
	}
	return out, nil
}

// removeCopy removes a checked-out desktop from the laptop.
func (l *Laptop) removeCopy(ctx context.Context, c *Checkout) error {
	if l.opts.VM != nil {
		if err := l.opts.VM.UndefineDesktop(ctx, c.Desktop); err != nil {
			l.log.Warn("undefine local VM", "desktop", c.Desktop, "err", err)
		}
	}
	if c.Stream != nil {
		if err := l.StopStream(c.Desktop, 10*time.Second); err != nil {
			l.log.Warn("stop the stream", "desktop", c.Desktop, "err", err)
		}
		os.Remove(c.Stream.Socket)
		if err := os.RemoveAll(l.streamDirOf(c.Desktop)); err != nil {
			return fmt.Errorf("purge desktop %s: %w", c.Desktop, err)
		}
	}
	shredded, err := l.shredCopy(c.Desktop)
	if err != nil {
		return fmt.Errorf("purge desktop %s: shred its keys: %w", c.Desktop, err)
	}
	if _, _, err := l.store.RemoveDesktop(c.Desktop, true); err != nil && !errors.Is(err, images.ErrNotFound) {
		return fmt.Errorf("purge desktop %s: %w", c.Desktop, err)
	}
	l.dropShredded(shredded)
	os.Remove(l.seedPath(c.Desktop))
	return l.st.Update(func(tx *catalog.Tx) error { return tx.Bucket(state.BucketCheckouts).Delete([]byte(c.Desktop)) })
}

// PurgeExpired is Laptop.PurgeExpired for an open store (opts as for
// OpenLaptop: the VM hook undefines a purged desktop's local VM): it costs one
// read of the catalog when no check-out has expired. A store opened read-only is
// purged through a read-write handle of its own. Every cvd command that opens a
// store calls it first.
func PurgeExpired(ctx context.Context, store *images.Store, opts LaptopOptions) ([]PurgeReport, error) {
	var expired bool
	now := laptopNow(store.Path(state.SyncDir))
	err := store.Catalog().View(func(tx *catalog.Tx) error {
		return tx.Bucket(state.BucketCheckouts).ForEach(func(k, v []byte) error {
			var c Checkout
			if _, err := state.GetJSON(tx, state.BucketCheckouts, string(k), &c); err == nil && c.expired(now) {
				expired = true
			}
			return nil
		})
	})
	if err != nil || !expired {
		return nil, err
	}
	if store.ReadOnly() {
		rw, err := images.Open(store.Dir(), images.OpenOptions{})
		if err != nil {
			return nil, err
		}
		defer rw.Close()
		store = rw
	}
	lp, err := OpenLaptop(store, opts)
	if err != nil {
		return nil, err
	}
	defer lp.Close()
	return lp.PurgeExpired(ctx)
}

func (l *Laptop) fetchDir() string { return filepath.Join(l.st.Dir, state.FetchDir) }

// Unsent is what a laptop's writable top holds that no check-in took yet.
type Unsent struct {
	Clusters int64 `json:"clusters"` // clusters the top allocates (data or zero)
	Bytes    int64 `json:"bytes"`    // guest bytes of its data clusters
}

// Unsent lists, per disk, the changes in the desktop's local tops not checked in
// yet: the clusters each top allocates itself. It reads the tops' metadata only.
func (l *Laptop) Unsent(desktop string) (map[string]Unsent, error) {
	// Each top alone: a streamed desktop's are in its stream directory.
	tops := map[string]func() (disk.Image, error){}
	if co, err := l.Checkout(desktop); err == nil && co.Stream != nil {
		for dn, sd := range co.Stream.Disks {
			tops[dn] = func() (disk.Image, error) {
				return disk.Open(sd.Top, disk.OpenOptions{ReadOnly: true, NoBacking: true})
			}
		}
	} else {
		d, err := l.store.Desktop(desktop)
		if err != nil {
			return nil, err
		}
		for _, dn := range proto.DiskNames {
			if rel := topRel(d, dn); rel != "" {
				tops[dn] = func() (disk.Image, error) { return l.store.OpenTop(rel, true, true) }
			}
		}
	}
	out := map[string]Unsent{}
	for dn, open := range tops {
		img, err := open()
		if err != nil {
			return nil, fmt.Errorf("desktop %s: %s top: %w", desktop, dn, err)
		}
		cs := int64(img.Info().ClusterSize)
		var u Unsent
		for win := int64(0); win < img.Size() && err == nil; win += 1 << 30 {
			var runs []images.ClusterRun
			runs, err = images.LayerRuns(img, win, min(1<<30, img.Size()-win), cs)
			for _, r := range runs {
				u.Clusters += r.Last - r.First + 1
				if r.Data {
					u.Bytes += (r.Last - r.First + 1) * cs
				}
			}
		}
		img.Close()
		if err != nil {
			return nil, err
		}
		out[dn] = u
	}
	return out, nil
}
