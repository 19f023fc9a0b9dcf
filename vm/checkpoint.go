package vm

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"

	"github.com/cvd-project/cvd/hypervisor"
	"github.com/cvd-project/cvd/images"
)

// Errors of Checkpoint.
var (
	// ErrNotRunning: a live checkpoint needs a running guest.
	ErrNotRunning = errors.New("domain not running")
	// ErrForeignTop: the domain does not write to the tops the catalog records
	// for the clone (the record would describe another chain).
	ErrForeignTop = errors.New("domain does not write to the clone's tops")
)

// CheckpointDisk is one disk of a live checkpoint.
type CheckpointDisk struct {
	Target string `json:"target"`
	// Frozen is the former top, now read-only under Top, kept in the store's
	// clones directory and listed in the clone's catalog entry.
	Frozen string `json:"frozen"`
	Top    string `json:"top"`
	N      int    `json:"n"` // the clone's checkpoint number on this disk
}

// Checkpoint takes a live, disk-only external snapshot of the running clone
// name: each top it writes is frozen (made read-only) and the guest's writes go
// to a new top over it, clones/NAME.cpN.qcow2; the catalog records the new tops
// and the frozen ones. The domain must write to exactly the tops the catalog
// records for the clone.
func Checkpoint(ctx context.Context, st *images.Store, conn *hypervisor.Conn, name string, log *slog.Logger) ([]CheckpointDisk, error) {
	c, err := st.Clone(name)
	if err != nil {
		return nil, err
	}
	info, err := conn.Info(ctx, name)
	if err != nil {
		return nil, err
	}
	if !info.Status.State.Active() {
		return nil, fmt.Errorf("domain %q is %s: %w: a live checkpoint needs a running guest", name, info.Status, ErrNotRunning)
	}
	sysFile := images.CheckpointFile(name, len(c.Checkpoints)+1, false)
	want := map[string]string{st.Path(c.Disk): sysFile}
	if c.UserDisk != "" {
		want[st.Path(c.UserDisk)] = images.CheckpointFile(name, len(c.UserCheckpoints)+1, true)
	}
	newTops := map[string]string{}
	var newSys, newUser string
	for _, d := range info.Disks {
		if d.ReadOnly || len(d.Chain) == 0 {
			continue
		}
		rel, ok := want[d.Chain[0].Path]
		if !ok {
			return nil, fmt.Errorf("domain %q writes to %s, which is not a top of clone %s (catalog: %s): %w: refusing",
				name, d.Chain[0].Path, name, st.Path(c.Disk), ErrForeignTop)
		}
		delete(want, d.Chain[0].Path)
		newTops[d.Target] = st.Path(rel)
		if rel == sysFile {
			newSys = rel
		} else {
			newUser = rel
		}
	}
	for p := range want {
		return nil, fmt.Errorf("domain %q does not write to clone %s's top %s: %w: refusing (cvd vm stop, then cvd vm start redefines it)",
			name, name, p, ErrForeignTop)
	}
	cps, err := conn.CheckpointDisks(ctx, name, newTops)
	if err != nil {
		return nil, err
	}
	for _, cp := range cps {
		// The guest no longer writes it: make that visible.
		if err := os.Chmod(cp.Frozen, 0o444); err != nil {
			log.Warn("make frozen checkpoint read-only", "file", cp.Frozen, "err", err)
		}
	}
	c2, err := st.RecordCheckpoint(name, newSys, newUser)
	if err != nil {
		return nil, fmt.Errorf("domain %q now writes to %v, but recording the checkpoint in the catalog failed: %w (the files are in place; cvd store check reports them)", name, newTops, err)
	}
	var out []CheckpointDisk
	for _, cp := range cps {
		n := len(c2.Checkpoints)
		if cp.Top == st.Path(newUser) && newUser != "" {
			n = len(c2.UserCheckpoints)
		}
		out = append(out, CheckpointDisk{Target: cp.Target, Frozen: cp.Frozen, Top: cp.Top, N: n})
	}
	return out, nil
}
