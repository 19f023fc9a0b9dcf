package desktop

import (
	"context"
	"fmt"
	"time"

	"github.com/cvd-project/cvd/images"
)

// switchDesktop points desktop d at the new top b built, and lets edit change the
// rest of the record, in one store transaction that also ends b's Pending (so the
// new top becomes the desktop's and the old one is removed after the commit). The
// record must still be as d was (same head, same system top). A pending switch
// is cleared: this is the switch. On error the new top is removed.
func switchDesktop(st *images.Store, b *built, d *images.Desktop, edit func(x *images.Desktop) error) (*images.Desktop, error) {
	nd, err := st.UpdateDesktop(b.p, d.Name, func(x *images.Desktop) error {
		if x.Head != d.Head || x.SystemDisk != d.SystemDisk {
			return fmt.Errorf("desktop %s changed while its new chain was built (head %d, top %s)", d.Name, x.Head, x.SystemDisk)
		}
		if err := edit(x); err != nil {
			return err
		}
		x.SystemDisk = b.topRel
		x.Switch = nil
		return nil
	})
	if err != nil {
		b.p.Abort()
		return nil, fmt.Errorf("switch desktop %s: %w", d.Name, err)
	}
	return nd, nil
}

// markSwitch records, for a desktop in use, the recompose to apply at its next
// start (ApplySwitch). Nothing is built now.
func markSwitch(st *images.Store, p *DesktopPlan, newLower string, policy Policy) error {
	_, err := st.UpdateDesktop(nil, p.Desktop, func(x *images.Desktop) error {
		if x.Head != p.FromHead {
			return fmt.Errorf("desktop %s: its head moved from %d to %d since the plan", x.Name, p.FromHead, x.Head)
		}
		x.Switch = &images.PendingSwitch{System: newLower, FromHead: p.FromHead, Policy: string(policy),
			Requested: time.Now().UTC().Truncate(time.Second)}
		return nil
	})
	return err
}

// ApplySwitch carries out the recompose marked on a desktop that was in use when
// it was requested (Desktop.Switch), with the policy recorded then. Call it before
// the desktop starts again (a check-out, a start of its VM). It returns nil, nil
// when nothing is marked. A desktop whose delta conflicts under the keep policy
// stays where it is and keeps its mark; the report says so.
func ApplySwitch(ctx context.Context, st *images.Store, name string) (*DesktopPlan, error) {
	d, err := st.Desktop(name)
	if err != nil {
		return nil, err
	}
	if d.Switch == nil {
		return nil, nil
	}
	rep, err := Recompose(ctx, st, RecomposeSpec{
		Desktops: []string{name},
		Apps:     []string{d.Switch.System},
		Policy:   Policy(d.Switch.Policy),
		InUse:    func(*images.Desktop) (bool, error) { return false, nil },
		Workers:  1,
	})
	if err != nil {
		return nil, fmt.Errorf("apply the switch marked on %s: %w", name, err)
	}
	p := rep.Desktops[0]
	if p.Action == ActionNone {
		// Already on the new layers: drop the mark.
		if _, err := st.UpdateDesktop(nil, name, func(x *images.Desktop) error { x.Switch = nil; return nil }); err != nil {
			return &p, err
		}
	}
	return &p, nil
}
