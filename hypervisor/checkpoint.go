package hypervisor

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"time"

	libvirt "github.com/digitalocean/go-libvirt"
	"libvirt.org/go/libvirtxml"
)

// Checkpoint is one disk's chain after a live checkpoint.
type Checkpoint struct {
	Target string // guest device, e.g. "vda"
	// Frozen is the former top. The guest no longer writes it: it is now a
	// read-only layer under Top, ready to be sealed.
	Frozen string
	// Top is the new writable top, a qcow2 overlay created by libvirt whose
	// backing file is Frozen (its absolute path, with the backing format
	// recorded).
	Top string
}

// Checkpoint freezes the writable top of a running domain's first writable disk
// as a read-only layer and sends the guest's writes to a new top at newTop (which
// must not exist; libvirt creates it as qcow2), while the guest keeps running. It
// is a disk-only external snapshot without libvirt snapshot metadata: the chain
// itself is the record. The persistent definition follows, so the next start
// boots on the new top. For a domain that is not running it gives ErrNotRunning:
// stopped disks are layered with package disk instead.
func (c *Conn) Checkpoint(ctx context.Context, name, newTop string) (Checkpoint, error) {
	const op = "checkpoint"
	d, err := c.lookup(ctx, op, name)
	if err != nil {
		return Checkpoint{}, err
	}
	info, err := c.info(ctx, op, d)
	if err != nil {
		return Checkpoint{}, err
	}
	for _, d := range info.Disks {
		if !d.ReadOnly {
			cps, err := c.checkpoint(ctx, name, map[string]string{d.Target: newTop})
			if err != nil {
				return Checkpoint{}, err
			}
			return cps[0], nil
		}
	}
	return Checkpoint{}, opErr(op, name, ErrInvalidSpec, "no writable disk")
}

// CheckpointDisks checkpoints several disks of a running domain at once
// (atomically: all or none), newTops mapping a target ("vda") to its new top's
// path. Other disks are left alone. Results are sorted by target.
func (c *Conn) CheckpointDisks(ctx context.Context, name string, newTops map[string]string) ([]Checkpoint, error) {
	return c.checkpoint(ctx, name, newTops)
}

func (c *Conn) checkpoint(ctx context.Context, name string, newTops map[string]string) ([]Checkpoint, error) {
	const op = "checkpoint"
	if len(newTops) == 0 {
		return nil, opErr(op, name, ErrInvalidSpec, "no disk to checkpoint")
	}
	d, err := c.lookup(ctx, op, name)
	if err != nil {
		return nil, err
	}
	info, err := c.info(ctx, op, d)
	if err != nil {
		return nil, err
	}
	if !info.Status.State.Active() {
		return nil, opErr(op, name, ErrNotRunning, "it is %s; a live checkpoint needs a running guest", info.Status)
	}
	byTarget := map[string]DiskInfo{}
	for _, di := range info.Disks {
		byTarget[di.Target] = di
	}
	tops := map[string]string{}
	seen := map[string]bool{}
	for target, top := range newTops {
		di, ok := byTarget[target]
		if !ok {
			return nil, opErr(op, name, ErrInvalidSpec, "no disk %q", target)
		}
		if di.ReadOnly {
			return nil, opErr(op, name, ErrInvalidSpec, "disk %s is read-only", target)
		}
		if len(di.Chain) == 0 || di.Chain[0].Path == "" {
			return nil, opErr(op, name, ErrInvalidSpec, "disk %s is not a file", target)
		}
		abs, err := filepath.Abs(top)
		if err != nil {
			return nil, opErr(op, name, ErrInvalidSpec, "new top %q: %v", top, err)
		}
		if seen[abs] {
			return nil, opErr(op, name, ErrInvalidSpec, "new top %s given twice", abs)
		}
		seen[abs] = true
		if _, err := os.Lstat(abs); err == nil {
			return nil, opErr(op, name, ErrExists, "new top %s exists", abs)
		} else if !errors.Is(err, os.ErrNotExist) {
			return nil, &Error{Op: op, Domain: name, Err: err}
		}
		if st, err := os.Stat(filepath.Dir(abs)); err != nil || !st.IsDir() {
			return nil, opErr(op, name, ErrInvalidSpec, "directory of new top %s does not exist", abs)
		}
		tops[target] = abs
	}

	snap := libvirtxml.DomainSnapshot{
		Name:        fmt.Sprintf("cvd-checkpoint-%d", time.Now().UnixNano()),
		Description: "cvd live checkpoint",
		Disks:       &libvirtxml.DomainSnapshotDisks{},
	}
	for _, di := range info.Disks {
		sd := libvirtxml.DomainSnapshotDisk{Name: di.Target, Snapshot: "no"}
		if top, ok := tops[di.Target]; ok {
			sd.Snapshot = "external"
			sd.Driver = &libvirtxml.DomainDiskDriver{Type: "qcow2"}
			sd.Source = &libvirtxml.DomainDiskSource{File: &libvirtxml.DomainDiskSourceFile{File: top}}
		}
		snap.Disks.Disks = append(snap.Disks.Disks, sd)
	}
	sx, err := snap.Marshal()
	if err != nil {
		return nil, &Error{Op: op, Domain: name, Msg: "render snapshot XML: " + err.Error()}
	}
	flags := libvirt.DomainSnapshotCreateDiskOnly | libvirt.DomainSnapshotCreateNoMetadata | libvirt.DomainSnapshotCreateAtomic
	err = c.do(ctx, op, name, func() error {
		_, err := c.l.DomainSnapshotCreateXML(d, sx, uint32(flags))
		return err
	})
	if err != nil {
		return nil, err
	}

	// Read back what libvirt did: each disk's top must be the new file, over the
	// old top.
	after, err := c.info(ctx, op, d)
	if err != nil {
		return nil, err
	}
	var out []Checkpoint
	for _, di := range after.Disks {
		top, ok := tops[di.Target]
		if !ok {
			continue
		}
		old := byTarget[di.Target].Chain[0].Path
		if len(di.Chain) < 2 || di.Chain[0].Path != top || di.Chain[1].Path != old {
			return nil, &Error{Op: op, Domain: name,
				Msg: fmt.Sprintf("disk %s: after the snapshot the chain is %v, want %s over %s", di.Target, di.Chain, top, old)}
		}
		out = append(out, Checkpoint{Target: di.Target, Frozen: old, Top: top})
	}
	slices.SortFunc(out, func(a, b Checkpoint) int {
		if a.Target < b.Target {
			return -1
		}
		if a.Target > b.Target {
			return 1
		}
		return 0
	})
	return out, nil
}
