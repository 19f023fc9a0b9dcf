package desktop

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"strings"
	"time"

	"github.com/cvd-project/cvd/disk"
	"github.com/cvd-project/cvd/images"
)

// A desktop's writable tops (desktops/<name>.system.qcow2, .user.qcow2) always
// stand on the head version's layers: when the head moves, they are replaced by
// fresh, empty tops (ResetTops). A top that holds data is never replaced: it is
// sealed as a version first (SealTops).

// ErrInUse: a desktop's top is open in a running VM (QEMU holds its image lock):
// it is not sealed, checked in or reset. Wraps disk.ErrInUse.
var ErrInUse = errors.New("desktop in use by a running VM")

// Create makes a desktop (images.Store.CreateDesktop): its first version and
// its writable tops.
func Create(ctx context.Context, st *images.Store, name string, spec images.DesktopSpec) (*images.Desktop, error) {
	return st.CreateDesktop(ctx, name, spec)
}

// CheckNotInUse refuses (ErrInUse) when a QEMU process holds one of the
// desktop's tops open: whatever libvirt says, a top a VM still writes is never
// sealed.
func CheckNotInUse(st *images.Store, d *images.Desktop) error {
	for _, rel := range []string{d.SystemDisk, d.UserDisk} {
		if rel == "" {
			continue
		}
		if err := disk.CheckNotInUse(st.Path(rel)); err != nil {
			if errors.Is(err, disk.ErrInUse) {
				return fmt.Errorf("desktop %s: %w: %v; shut the VM down first (nothing was changed)", d.Name, ErrInUse, err)
			}
			return err
		}
	}
	return nil
}

// mapWindow is the guest bytes asked of MapLayer at a time (bounds memory).
const mapWindow = 1 << 30

// HasData reports whether img's own layer allocates anything (data or zero).
func HasData(img disk.Image) (bool, error) {
	size := img.Size()
	for win := int64(0); win < size; win += mapWindow {
		exts, err := img.MapLayer(win, min(mapWindow, size-win))
		if err != nil {
			return false, err
		}
		for _, e := range exts {
			if e.State != disk.Unallocated && e.Len > 0 {
				return true, nil
			}
		}
	}
	return false, nil
}

// TopState opens a top alone and reports whether it allocates anything and the
// layer ID its backing file names ("" for none).
func TopState(path string) (hasData bool, backing string, err error) {
	img, err := disk.Open(path, disk.OpenOptions{ReadOnly: true, NoBacking: true})
	if err != nil {
		return false, "", err
	}
	defer img.Close()
	if bn := img.Info().BackingName; bn != "" {
		backing = strings.TrimSuffix(filepath.Base(bn), ".qcow2")
	}
	hasData, err = HasData(img)
	return hasData, backing, err
}

// SealTop seals the top at path into the store as a layer on the one it stands
// on (a top without a backing file becomes a layer without a parent).
func SealTop(ctx context.Context, st *images.Store, path string, names []string, force bool) (*images.Layer, bool, error) {
	img, err := disk.Open(path, disk.OpenOptions{ReadOnly: true, NoBacking: true})
	if err != nil {
		return nil, false, err
	}
	backing := img.Info().BackingName
	img.Close()
	opts := images.ImportOptions{Names: names, Force: force}
	if backing == "" {
		opts.Kind = images.KindBase
		return st.Import(ctx, path, opts)
	}
	return st.Seal(ctx, path, opts)
}

// SealTops seals the desktop's tops that hold data as a new head version (a
// seal; note says why) and resets them onto it. It returns the desktop and the
// version, or a nil version when the tops held nothing. A top open in a running
// VM refuses it (ErrInUse) before anything changes.
func SealTops(ctx context.Context, st *images.Store, name, note string, now time.Time) (*images.Desktop, *images.Version, error) {
	d, err := st.Desktop(name)
	if err != nil {
		return nil, nil, err
	}
	if err := CheckNotInUse(st, d); err != nil {
		return nil, nil, err
	}
	head := *d.HeadVersion()
	nv := images.Version{Created: now.UTC().Truncate(time.Second), System: head.System, User: head.User,
		Kind: images.VersionSeal, Note: note, From: head.N}
	changed := false
	for _, t := range []struct {
		rel, disk string
		layer     *string
	}{{d.SystemDisk, "system", &nv.System}, {d.UserDisk, "user", &nv.User}} {
		if t.rel == "" {
			continue
		}
		has, _, err := TopState(st.Path(t.rel))
		if err != nil {
			return nil, nil, fmt.Errorf("desktop %s: %s top: %w", name, t.disk, err)
		}
		if !has {
			continue
		}
		l, _, err := SealTop(ctx, st, st.Path(t.rel), nil, false)
		if err != nil {
			return nil, nil, fmt.Errorf("desktop %s: seal %s top: %w", name, t.disk, err)
		}
		*t.layer, changed = l.ID, true
	}
	if !changed {
		return d, nil, nil
	}
	d, v, err := AddVersion(st, name, nv, true, 0)
	if err != nil {
		return nil, nil, err
	}
	if err := ResetTops(st, d, v); err != nil {
		return nil, nil, err
	}
	return d, &v, nil
}

// Rollback makes the layers of version to the desktop's head again, as a new
// version ("rollback to N"): nothing is discarded, and a device that checked out
// an older head checks in as a conflict. Data on the desktop's tops is sealed as
// its own version first (sealed; nil when the tops held nothing).
func Rollback(ctx context.Context, st *images.Store, name string, to int, now time.Time) (sealed, v *images.Version, err error) {
	d, sealed, err := SealTops(ctx, st, name, "server changes before rollback", now)
	if err != nil {
		return nil, nil, err
	}
	var target *images.Version
	for i := range d.Versions {
		if d.Versions[i].N == to {
			target = &d.Versions[i]
		}
	}
	if target == nil {
		return sealed, nil, fmt.Errorf("desktop %s: version %d: %w", name, to, images.ErrNotFound)
	}
	nv := images.Version{Created: now.UTC().Truncate(time.Second), System: target.System, User: target.User,
		Kind: images.VersionRollback, Note: fmt.Sprintf("rollback to %d", to), From: d.Head}
	d, added, err := AddVersion(st, name, nv, true, 0)
	if err != nil {
		return sealed, nil, err
	}
	if err := ResetTops(st, d, added); err != nil {
		return sealed, nil, err
	}
	return sealed, &added, nil
}

// RepairTops finishes what a crash interrupted: a top that does not stand on
// the head's layer (a move of the head whose reset did not happen) is reset
// when it is empty; one that holds data is kept, to be sealed by the next
// SealTops. It returns the disks it reset and those it kept.
func RepairTops(st *images.Store, d *images.Desktop) (reset, kept []string, err error) {
	head := d.HeadVersion()
	if head == nil {
		return nil, nil, nil
	}
	for _, t := range []struct{ rel, layer, disk string }{{d.SystemDisk, head.System, "system"}, {d.UserDisk, head.User, "user"}} {
		if t.rel == "" {
			continue
		}
		has, backing, err := TopState(st.Path(t.rel))
		if err != nil {
			return reset, kept, fmt.Errorf("desktop %s: %s top: %w", d.Name, t.disk, err)
		}
		if backing == t.layer {
			continue
		}
		if has {
			kept = append(kept, t.disk)
			continue
		}
		size := int64(0)
		if t.layer == "" {
			size = d.UserSize
		}
		if err := ResetTop(st, t.rel, t.layer, size); err != nil {
			return reset, kept, err
		}
		reset = append(reset, t.disk)
	}
	return reset, kept, nil
}
