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
	c, err := NewClient(co.Server, co.Token, ClientOptions{CACert: co.CACert})
	if err != nil {
		return nil, err
	}
	lease, err := c.Renew(ctx, name, co.Lease.ID, ttl)
	if err != nil {
		return nil, err
	}
	co.Lease = *lease
	co.LastRenew = l.now().UTC()
	return lease, l.putCheckout(co)
}

// Release gives the lease back without checking in; the local copy is removed
// (changes not checked in are refused unless discard).
func (l *Laptop) Release(ctx context.Context, name string, discard bool) error {
	co, err := l.Checkout(name)
	if err != nil {
		return err
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
		c, err := NewClient(co.Server, co.Token, ClientOptions{CACert: co.CACert})
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
	// Running reports whether the desktop's local VM runs; a running desktop is
	// not checked in (its top is being written). nil: never running.
	Running func(ctx context.Context, desktop string) bool
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
	lp, err := OpenLaptop(store, LaptopOptions{Logger: opts.Logger, Progress: opts.Progress, VM: opts.VM})
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
		if opts.RenewWithin == 0 || co.Lease.Expires.Sub(lp.now()) < opts.RenewWithin {
			l, err := lp.Renew(ctx, co.Desktop, 0)
			if err != nil {
				evs = append(evs, AgentEvent{Desktop: co.Desktop, Action: "failed", Detail: "renew: " + err.Error()})
				continue
			}
			evs = append(evs, AgentEvent{Desktop: co.Desktop, Action: "renewed", Detail: "until " + l.Expires.Format(time.RFC3339)})
		}
		due := co.Pending != nil || (opts.CheckinEvery > 0 && lp.now().Sub(lastSync(&co)) >= opts.CheckinEvery)
		if !due {
			continue
		}
		if opts.Running != nil && opts.Running(ctx, co.Desktop) {
			evs = append(evs, AgentEvent{Desktop: co.Desktop, Action: "skipped", Detail: "check-in: the desktop's VM is running"})
			continue
		}
		rep, err := lp.CheckIn(ctx, co.Desktop, CheckinOptions{})
		if err != nil {
			evs = append(evs, AgentEvent{Desktop: co.Desktop, Action: "failed", Detail: "check-in: " + err.Error()})
			continue
		}
		if rep.NoChanges {
			// Nothing to send: remember the attempt so the next one waits a period.
			if c, err := lp.Checkout(co.Desktop); err == nil {
				c.LastCheckin = lp.now().UTC()
				lp.putCheckout(c)
			}
			evs = append(evs, AgentEvent{Desktop: co.Desktop, Action: "checked-in", Detail: "no changes"})
			continue
		}
		evs = append(evs, AgentEvent{Desktop: co.Desktop, Action: "checked-in",
			Detail: fmt.Sprintf("version %d, %d bytes sent", rep.Version, rep.Payload)})
	}
	return evs, nil
}

func lastSync(co *Checkout) time.Time {
	if co.LastCheckin.After(co.CheckedOut) {
		return co.LastCheckin
	}
	return co.CheckedOut
}
