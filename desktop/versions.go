package desktop

import (
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"sort"

	"github.com/cvd-project/cvd/disk"
	"github.com/cvd-project/cvd/images"
	"github.com/cvd-project/cvd/internal/fsutil"
	"github.com/cvd-project/cvd/internal/proc"
)

// AddVersion appends v to the desktop's versions in one catalog transaction (its
// number is the next free one) and, with setHead, makes it the head. A version
// made from another (v.From set: a check-in) moves the head only if the head is
// still v.From in that transaction; otherwise (another process rolled back or
// added a version since) it is kept beside the head as a conflict. It returns
// the desktop as it is afterwards and the version added.
//
// A fence above 0 is the epoch of the lease a check-in was made under: when the
// desktop's active lease in that transaction has another epoch (an
// administrator broke it, another device took the desktop since), the version
// is kept as a conflict too.
func AddVersion(st *images.Store, name string, v images.Version, setHead bool, fence int64) (*images.Desktop, images.Version, error) {
	return AddPush(st, name, v, setHead, fence, nil)
}

// Push says which disks a check-in changed, and the layer each change was made
// on (nil: the disk was left alone).
type Push struct {
	System, User *string
}

// FastForward reports whether every disk p changed was changed on the layer
// that head's disk stands on: the check-in then moves the head, whichever
// version it started from (another device may have moved the other disk
// since); a disk changed on another layer makes it a conflict.
func (p *Push) FastForward(head *images.Version) bool {
	return p != nil && head != nil && (p.System != nil || p.User != nil) &&
		(p.System == nil || *p.System == head.System) && (p.User == nil || *p.User == head.User)
}

// AddPush is AddVersion for a device's check-in that changed the disks push
// names (nil: compare versions, as AddVersion does). The check-in moves the
// head when each disk it changed stands on the head's layer for that disk
// (push.FastForward; its other disks take the head's layers) and its lease's
// epoch is the desktop's (fence); otherwise it is kept as a conflict.
func AddPush(st *images.Store, name string, v images.Version, setHead bool, fence int64, push *Push) (*images.Desktop, images.Version, error) {
	var added images.Version
	d, err := st.UpdateDesktop(nil, name, func(d *images.Desktop) error {
		fenced := fence > 0 && d.LeaseEpoch != fence
		behind := v.From != 0 && d.Head != v.From
		if push != nil {
			behind = !push.FastForward(d.HeadVersion())
			if h := d.HeadVersion(); !behind {
				if push.System == nil {
					v.System = h.System
				}
				if push.User == nil {
					v.User = h.User
				}
			}
		}
		if setHead && (fenced || behind) {
			setHead, v.Conflict = false, true
			if v.Kind == images.VersionCheckin {
				v.Kind, v.Note = images.VersionConflict, CheckinNote(images.VersionConflict, v.Checkin)
			}
		}
		v.N = 1
		for _, x := range d.Versions {
			v.N = max(v.N, x.N+1)
		}
		d.Versions = append(d.Versions, v)
		if setHead {
			d.Head = v.N
		}
		added = v
		return nil
	})
	return d, added, err
}

// CheckinNote is a check-in version's note: its kind and the check-in's short ID.
func CheckinNote(kind images.VersionKind, id string) string {
	return string(kind) + " " + id[:min(12, len(id))]
}

// RecordVersion makes v, numbered as the server numbered it, the head of a copy
// of a desktop (a laptop's): added, or replacing a version of that number; fresh
// replaces the history the copy was created with.
func RecordVersion(st *images.Store, name string, v images.Version, fresh bool) error {
	_, err := st.UpdateDesktop(nil, name, func(d *images.Desktop) error {
		if fresh {
			d.Versions = nil
		}
		d.Versions = slices.DeleteFunc(d.Versions, func(x images.Version) bool { return x.N == v.N })
		d.Versions = append(d.Versions, v)
		sort.Slice(d.Versions, func(i, j int) bool { return d.Versions[i].N < d.Versions[j].N })
		d.Head = v.N
		return nil
	})
	return err
}

// ResetTop replaces the top at the store-relative path rel by an empty overlay
// on layer id (or a blank disk of size bytes when id is ""): the new top is
// written under a temporary name and renamed over the old one, so the top is
// always whole.
func ResetTop(st *images.Store, rel, id string, size int64) error {
	path := st.Path(rel)
	tmp := filepath.Join(filepath.Dir(path), proc.TempPrefix()+randSuffix()+".qcow2")
	enc, err := st.TopEncryption(rel)
	if err != nil {
		return fmt.Errorf("create top %s: %w", filepath.Base(path), err)
	}
	co := disk.CreateOptions{Size: size, AllowedRoots: []string{st.Dir()}, Encrypt: enc}
	if id != "" {
		l, err := st.Layer(id)
		if err != nil {
			return err
		}
		co.BackingFile, co.BackingFormat, co.Size = st.LayerPath(id), disk.FormatQcow2, l.Size
	}
	if err := disk.CreateFile(tmp, co); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("create top %s: %w", filepath.Base(path), err)
	}
	if err := os.Rename(tmp, path); err != nil {
		os.Remove(tmp)
		return err
	}
	return fsutil.Sync(filepath.Dir(path))
}

// ResetTops points the desktop's tops at version v's layers (a user disk without
// a layer becomes a blank disk of the desktop's user size).
func ResetTops(st *images.Store, d *images.Desktop, v images.Version) error {
	for _, t := range []struct{ rel, layer, disk string }{{d.SystemDisk, v.System, "system"}, {d.UserDisk, v.User, "user"}} {
		if t.rel == "" {
			continue
		}
		size := int64(0)
		if t.layer == "" {
			size = d.UserSize
		}
		if err := ResetTop(st, t.rel, t.layer, size); err != nil {
			return fmt.Errorf("desktop %s: reset %s top: %w", d.Name, t.disk, err)
		}
	}
	return nil
}

// MergeVersions adds to a desktop the versions of vs whose numbers it does not
// have (the history an earlier release kept elsewhere), and makes head the head
// when it is then among them.
func MergeVersions(st *images.Store, name string, vs []images.Version, head int) error {
	_, err := st.UpdateDesktop(nil, name, func(d *images.Desktop) error {
		for _, v := range vs {
			if !slices.ContainsFunc(d.Versions, func(x images.Version) bool { return x.N == v.N }) {
				d.Versions = append(d.Versions, v)
			}
		}
		sort.Slice(d.Versions, func(i, j int) bool { return d.Versions[i].N < d.Versions[j].N })
		if slices.ContainsFunc(d.Versions, func(x images.Version) bool { return x.N == head }) {
			d.Head = head
		}
		return nil
	})
	return err
}
