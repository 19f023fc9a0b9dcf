package overlay

import (
	"errors"
	"fmt"

	"github.com/cvd-project/cvd/images"
)

// ErrCannotSwitch: the store has no transaction that switches a desktop to a new
// chain (images.Store.UpdateDesktop), so a plan can be reported but not applied.
var ErrCannotSwitch = errors.New("the store cannot switch desktops yet (needs images.Store.UpdateDesktop)")

// ErrCannotMark: a desktop in use cannot be marked to switch at its next start
// (the store has no such flag yet).
var ErrCannotMark = errors.New("marking a desktop to switch at its next start needs the store's Desktop.Switch flag")

// desktopUpdater is the store's one transaction that changes a desktop record and
// ends a Pending (its journaled files become the desktop's; files the record no
// longer names are removed after the commit).
type desktopUpdater interface {
	UpdateDesktop(p *images.Pending, name string, fn func(d *images.Desktop) error) (*images.Desktop, error)
}

// switchDesktop points desktop d at the new top b built, and lets edit change the
// rest of the record, in one store transaction. The record must still be as d
// was (same head, same system top). On error the new top is removed.
func switchDesktop(st *images.Store, b *built, d *images.Desktop, edit func(x *images.Desktop) error) (*images.Desktop, error) {
	u, ok := any(st).(desktopUpdater)
	if !ok {
		b.p.Abort()
		return nil, ErrCannotSwitch
	}
	nd, err := u.UpdateDesktop(b.p, d.Name, func(x *images.Desktop) error {
		if x.Head != d.Head || x.SystemDisk != d.SystemDisk {
			return fmt.Errorf("desktop %s changed while its new chain was built (head %d, top %s)", d.Name, x.Head, x.SystemDisk)
		}
		if err := edit(x); err != nil {
			return err
		}
		x.SystemDisk = b.topRel
		return nil
	})
	if err != nil {
		b.p.Abort()
		return nil, fmt.Errorf("switch desktop %s: %w", d.Name, err)
	}
	return nd, nil
}
