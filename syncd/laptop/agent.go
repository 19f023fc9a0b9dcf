package laptop

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/cvd-project/cvd/desktop"
	"github.com/cvd-project/cvd/images"
	"github.com/cvd-project/cvd/syncd/proto"
)

// Renew extends the lease of a checked-out desktop (ttl 0: the server's default).
func (l *Laptop) Renew(ctx context.Context, name string, ttl time.Duration) (*proto.Lease, error) {
	co, err := l.Checkout(name)
	if err != nil {
		return nil, err
	}
	if co.Lease.Expired(l.now()) {
		if _, err := l.PurgeExpired(ctx); err != nil {
			return nil, err
		}
		return nil, fmt.Errorf("desktop %s: %w at %s; it was purged", name, proto.ErrExpired, co.Lease.Expires.Format(time.RFC3339))
	}
	c, err := NewClient(co.Server, co.Token, ClientOptions{CACert: co.CACert, Pin: co.Pin})
	if err != nil {
		return nil, err
	}
	// A copy that still streams is not fit for offline use: its lease is an
	// online one until it has switched to local files.
	lease, err := c.Renew(ctx, name, co.Lease.ID, ttl, co.Stream != nil)
	if errors.Is(err, proto.ErrWiped) {
		return nil, errors.Join(err, l.wiped(ctx, co.Server))
	}
	if err != nil {
		return nil, err
	}
	co.Lease = *lease
	co.LastRenew = l.now().UTC()
	if err := l.rewrapKey(name, *lease); err != nil {
		return nil, err
	}
	return lease, l.putCheckout(co)
}

// Release gives the lease back without checking in; the local copy is removed
// (changes not checked in are refused unless discard).
func (l *Laptop) Release(ctx context.Context, name string, discard bool) error {
	co, err := l.Checkout(name)
	if err != nil {
		return err
	}
	if !discard && co.Stream != nil {
		for dn, sd := range co.Stream.Disks {
			if has, err := topHasData(sd.Top); err != nil {
				return err
			} else if has {
				return fmt.Errorf("desktop %s: %w on the %s disk (it streams: pin it, let it switch at its next start, then check it in, or release with --discard)", name, proto.ErrLocalChanges, dn)
			}
		}
	}
	if !discard {
		if d, err := l.store.Desktop(name); err == nil {
			for _, rel := range []string{d.SystemDisk, d.UserDisk} {
				if rel == "" {
					continue
				}
				if has, _, err := desktop.TopState(l.store.Path(rel)); err != nil {
					return err
				} else if has {
					return fmt.Errorf("desktop %s: %w: check it in with --release instead", name, proto.ErrLocalChanges)
				}
			}
		}
	}
	if !co.Offline {
		c, err := NewClient(co.Server, co.Token, ClientOptions{CACert: co.CACert, Pin: co.Pin})
		if err != nil {
			return err
		}
		if err := c.Release(ctx, name, co.Lease.ID); err != nil && !errors.Is(err, proto.ErrNoLease) && !errors.Is(err, proto.ErrLeaseExpired) {
			return err
		}
	}
	return l.removeCopy(ctx, co)
}

// AgentOptions controls an agent cycle.
type AgentOptions struct {
	// CheckinEvery checks a desktop in when its last check-in is older; 0 never.
	CheckinEvery time.Duration
	// RenewWithin renews a lease that expires sooner than this (0: always renew).
	RenewWithin time.Duration
	Logger      *slog.Logger
	Progress    Progress
	VM          LocalVM
	VNCListen   string // see LaptopOptions
	// Running reports whether the desktop's local VM runs; a running desktop is
	// not checked in (its top is being written). nil: never running.
	Running func(ctx context.Context, desktop string) bool
	// StartStream starts a streamed desktop's stream process when none runs
	// (the CLI's: a process of its own); nil leaves it to the user.
	StartStream func(ctx context.Context, lp *Laptop, desktop string) error
}

// AgentEvent is one thing an agent cycle did.
type AgentEvent struct {
	Desktop string `json:"desktop"`
	Action  string `json:"action"` // purged, renewed, checked-in, skipped, failed
	Detail  string `json:"detail,omitempty"`
}

// AgentCycle does one round of the laptop agent on the store in storeDir: purge
// expired copies (offline too), then for each desktop, renew its lease and check it
// in when due. A server that cannot be reached is not an error: the copy stays
// until it expires. The store is open only during the cycle.
func AgentCycle(ctx context.Context, storeDir string, opts AgentOptions) ([]AgentEvent, error) {
	store, err := images.Open(storeDir, images.OpenOptions{})
	if err != nil {
		return nil, err
	}
	defer store.Close()
	lp, err := OpenLaptop(store, LaptopOptions{Logger: opts.Logger, Progress: opts.Progress, VM: opts.VM, VNCListen: opts.VNCListen})
	if err != nil {
		return nil, err
	}
	defer lp.Close()
	var evs []AgentEvent
	purged, err := lp.PurgeExpired(ctx)
	for _, p := range purged {
		evs = append(evs, AgentEvent{Desktop: p.Desktop, Action: "purged", Detail: "lease expired " + p.Expired.Format(time.RFC3339)})
	}
	if err != nil {
		return evs, err
	}
	cos, err := lp.Checkouts()
	if err != nil {
		return evs, err
	}
	for _, co := range cos {
		if co.Offline {
			continue
		}
		evs = append(evs, lp.agentRound(ctx, co, opts)...)
	}
	return evs, nil
}

// agentRound is one desktop's part of an agent cycle. The active device
// renews its lease, hands the role over when another device asked for it, and
// checks in when due; every device of the group stages the head as its policy
// covers it (applied at once while the VM is down); an inactive one pushes its
// user disk when due.
func (lp *Laptop) agentRound(ctx context.Context, co Checkout, opts AgentOptions) []AgentEvent {
	var evs []AgentEvent
	ev := func(action, detail string) {
		evs = append(evs, AgentEvent{Desktop: co.Desktop, Action: action, Detail: detail})
	}
	running := opts.Running != nil && opts.Running(ctx, co.Desktop)
	c, cerr := NewClient(co.Server, co.Token, ClientOptions{CACert: co.CACert, Pin: co.Pin})
	if cerr == nil && !running {
		// A server that cannot be reached is reported once, by the steps below.
		if asked, console, err := lp.RunRequested(ctx, c, &co); err != nil && asked {
			ev("failed", "run the desktop here as asked: "+err.Error())
		} else if asked {
			ev("running-here", "as asked; console "+console)
			return evs
		}
	}
	if !co.Follow {
		if opts.RenewWithin == 0 || co.Lease.Expires.Sub(lp.now()) < opts.RenewWithin {
			l, err := lp.Renew(ctx, co.Desktop, 0)
			if err != nil {
				ev("failed", "renew: "+err.Error())
				return evs
			}
			ev("renewed", "until "+l.Expires.Format(time.RFC3339))
		}
		if co.Stream != nil {
			return append(evs, lp.streamRound(ctx, co, running, opts)...)
		}
		if asked, to, err := lp.HandOver(ctx, co.Desktop); err != nil {
			ev("failed", fmt.Sprintf("hand the role over to %s: %v", to, err))
		} else if asked {
			ev("handed-over", "the active role went to "+to)
			co.Follow = true
		}
	}
	if cerr != nil {
		ev("failed", "stage: "+cerr.Error())
	} else if rep, err := lp.Follow(ctx, c, co.Desktop, FollowOptions{Apply: !running}); err != nil {
		ev("failed", "stage: "+err.Error())
	} else if rep.Applied {
		ev("applied", fmt.Sprintf("version %d, %d bytes received", rep.Runs, rep.Bytes))
	} else if rep.Staged != 0 {
		ev("staged", fmt.Sprintf("version %d, applies at the next start; %d bytes received", rep.Staged, rep.Bytes))
	}
	due := co.Pending != nil || (opts.CheckinEvery > 0 && lp.now().Sub(lastSync(&co)) >= opts.CheckinEvery)
	if !due {
		return evs
	}
	if running {
		ev("skipped", "check-in: the desktop's VM is running")
		return evs
	}
	rep, err := lp.CheckIn(ctx, co.Desktop, CheckinOptions{UserOnly: co.Follow})
	if err != nil {
		ev("failed", "check-in: "+err.Error())
		return evs
	}
	if rep.NoChanges {
		// Nothing to send: remember the attempt so the next one waits a period.
		if c, err := lp.Checkout(co.Desktop); err == nil {
			c.LastCheckin = lp.now().UTC()
			lp.putCheckout(c)
		}
		ev("checked-in", "no changes")
		return evs
	}
	ev("checked-in", fmt.Sprintf("version %d, %d bytes sent", rep.Version, rep.Payload))
	return evs
}

// streamRound keeps a streamed desktop going: its stream process runs while
// layers are missing; once every layer arrived and the VM is down (its next
// start), the desktop switches to its local files.
func (lp *Laptop) streamRound(ctx context.Context, co Checkout, running bool, opts AgentOptions) []AgentEvent {
	ev := func(action, detail string) []AgentEvent {
		return []AgentEvent{{Desktop: co.Desktop, Action: action, Detail: detail}}
	}
	st, err := lp.StreamState(co.Desktop)
	if err == nil && st.Complete && !running {
		if err := lp.StopStream(co.Desktop, 30*time.Second); err != nil {
			return ev("failed", "stop the stream: "+err.Error())
		}
		if err := lp.SwitchStream(ctx, co.Desktop); err != nil {
			return ev("failed", "switch to local files: "+err.Error())
		}
		return ev("switched", "every layer arrived: the desktop runs on its local files")
	}
	if (err != nil || !st.Running) && opts.StartStream != nil {
		if err := opts.StartStream(ctx, lp, co.Desktop); err != nil {
			return ev("failed", "start the stream: "+err.Error())
		}
		return ev("stream-started", "serving its NBD exports")
	}
	return nil
}

func lastSync(co *Checkout) time.Time {
	if co.LastCheckin.After(co.CheckedOut) {
		return co.LastCheckin
	}
	return co.CheckedOut
}

// wiped carries out a wipe the server ordered: every copy checked out from it
// is crypto-shredded and removed, changes not checked in included.
func (l *Laptop) wiped(ctx context.Context, server string) error {
	cos, err := l.Checkouts()
	if err != nil {
		return err
	}
	var errs []error
	for _, c := range cos {
		if c.Server != server {
			continue
		}
		l.log.Warn("the server ordered this device wiped: removing the copy", "desktop", c.Desktop, "server", server)
		errs = append(errs, l.removeCopy(ctx, &c))
	}
	return errors.Join(errs...)
}
