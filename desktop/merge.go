package desktop

import (
	"context"
	"errors"
	"fmt"
	"os"
	"time"

	"github.com/cvd-project/cvd/disk"
	"github.com/cvd-project/cvd/files"
	"github.com/cvd-project/cvd/images"
	"github.com/cvd-project/cvd/internal/proc"
)

// Recompose by files (policy merge). Blocks cannot tell a desktop's changes
// from the file-system bookkeeping every boot writes, so a desktop that ever
// ran always conflicts at block level. Policy merge compares manifests
// instead: the desktop's own file changes (its chain against its old base
// and apps) are written by files.Apply over the new layers into a new version
// layer (the merged tree), under an empty top.
// A path the new layers changed too goes by the rules (files.RecomposeMerge).
// The desktop's old chain stays as its previous version: nothing it held is
// lost, and every overridden file is in the report.

// FileMerge is what policy merge does, or did, to one file system of a
// desktop's system disk.
type FileMerge struct {
	Partition int `json:"partition"`
	// Where the file system lies in the desktop's disk (the source) and in
	// the new layers (the target).
	SourceStart int64 `json:"source-start"`
	SourceSize  int64 `json:"source-size"`
	Start       int64 `json:"start"`
	Size        int64 `json:"size"`
	// The desktop's changes: files written, links and directories made,
	// paths removed, content bytes written.
	Writes  int   `json:"writes"`
	Makes   int   `json:"makes"`
	Removes int   `json:"removes"`
	Bytes   int64 `json:"bytes"`
	// SameInBoth counts changes the new layers already hold.
	SameInBoth int              `json:"same-in-both"`
	Overridden []files.Override `json:"overridden,omitempty"`
	Skipped    []files.Skip     `json:"skipped,omitempty"`
	// Applied is the writer's report, once applied.
	Applied *files.ApplyReport `json:"applied,omitempty"`
	ops     []files.Op
}

// planMerge fills p's file merges (or its refusal) for policy merge.
func (pl *planner) planMerge(ctx context.Context, dc *desktopChain, p *DesktopPlan) error {
	old, err := layerManifest(ctx, pl.st, dc.oldLower)
	if err != nil && !errors.Is(err, files.ErrNoFileSystem) {
		return fmt.Errorf("manifest of the old layers: %w", err)
	}
	neu, err := layerManifest(ctx, pl.st, pl.newLower)
	if err != nil && !errors.Is(err, files.ErrNoFileSystem) {
		return fmt.Errorf("manifest of the new layers: %w", err)
	}
	own, err := files.Manifest(ctx, dc.top)
	if errors.Is(err, files.ErrNoFileSystem) {
		p.Refused = "policy merge refused: no ext4 file system on the desktop's system disk"
		return nil
	}
	if err != nil {
		return fmt.Errorf("manifest of the desktop: %w", err)
	}
	rules := pl.rules
	if rules == nil {
		rules = files.DefaultRules()
	}
	for _, fs := range own {
		if fs.NeedsRecovery {
			p.Refused = fmt.Sprintf("policy merge refused: the file system of partition %d was not cleanly unmounted (its journal needs recovery); shut the desktop down cleanly first", fs.Partition)
			p.Files = nil
			return nil
		}
		n := fsAt(neu, fs.Partition)
		if n == nil {
			p.Refused = fmt.Sprintf("policy merge refused: the new layers have no ext4 file system at partition %d", fs.Partition)
			p.Files = nil
			return nil
		}
		var base []files.Entry
		if o := fsAt(old, fs.Partition); o != nil {
			base = o.Files
		}
		if fs.Type != "ext4" || n.Type != "ext4" {
			// The writer writes ext4: the new layers' file system stays as it
			// is; what the desktop changed there is listed, not carried.
			fm := FileMerge{Partition: fs.Partition, SourceStart: fs.Start, SourceSize: fs.Size, Start: n.Start, Size: n.Size}
			for _, c := range files.Diff(base, fs.Files) {
				fm.Skipped = append(fm.Skipped, files.Skip{Path: c.Path, Why: "changed by the desktop on a " + fs.Type + " file system: the new layers' version is kept (the merge writes ext4 only)"})
			}
			if len(fm.Skipped) > 0 {
				p.Files = append(p.Files, fm)
			}
			continue
		}
		mp := files.RecomposeMerge(base, fs.Files, n.Files, rules)
		fm := FileMerge{Partition: fs.Partition, SourceStart: fs.Start, SourceSize: fs.Size, Start: n.Start, Size: n.Size,
			SameInBoth: mp.Unchanged, Overridden: mp.Overridden, Skipped: mp.Skipped, ops: mp.Ops}
		for _, o := range mp.Ops {
			switch o.Kind {
			case files.OpWrite:
				fm.Writes++
				fm.Bytes += o.Entry.Size
			case files.OpRemove:
				fm.Removes++
			default:
				fm.Makes++
			}
		}
		p.Files = append(p.Files, fm)
		p.Cost.ReadBytes += fm.Bytes
		p.Cost.WriteBytes += fm.Bytes
	}
	if g := p.Granularity; g > 0 {
		p.Cost.ReadClusters = (p.Cost.ReadBytes + g - 1) / g
		p.Cost.WriteClusters = p.Cost.ReadClusters
	}
	return nil
}

// buildMerge makes a desktop's new chain for policy merge: the planned file
// changes written over the new layers into a new version layer (the merged
// tree, judged file system by file system by e2fsck before it is sealed), and
// an empty top on it.
func buildMerge(ctx context.Context, st *images.Store, d *images.Desktop, newLower string, p *DesktopPlan) (*built, error) {
	dc, err := openDesktopChain(st, d)
	if err != nil {
		return nil, err
	}
	defer dc.Close()
	tmp := st.Path(images.DesktopsDir + "/" + proc.TempPrefix() + "files-" + randSuffix() + ".qcow2")
	defer os.Remove(tmp)
	info := dc.top.Info()
	if err := disk.CreateFile(tmp, disk.CreateOptions{Size: dc.top.Size(), ClusterSize: info.ClusterSize,
		BackingFile: st.LayerPath(newLower), BackingFormat: disk.FormatQcow2, AllowedRoots: []string{st.Dir()}}); err != nil {
		return nil, fmt.Errorf("desktop %s: merge layer: %w", d.Name, err)
	}
	for i := range p.Files {
		fm := &p.Files[i]
		if len(fm.ops) == 0 {
			continue
		}
		rep, err := files.Apply(ctx, files.Source{Img: dc.top, Start: fm.SourceStart, Size: fm.SourceSize},
			files.Target{Path: tmp, Start: fm.Start, Size: fm.Size}, fm.ops)
		if err != nil {
			return nil, fmt.Errorf("desktop %s: partition %d: %w", d.Name, fm.Partition, err)
		}
		fm.Applied = rep
	}
	l, _, err := st.Seal(ctx, tmp, images.ImportOptions{Kind: images.KindVersion})
	if err != nil {
		return nil, fmt.Errorf("desktop %s: seal the merged tree: %w", d.Name, err)
	}
	return build(ctx, st, d, l.ID, true)
}

// UserMerge is a file-level merge of two devices' user disks (SyncMergeLayers).
type UserMerge struct {
	// Layer is the merged tree, a new version layer on the here layer.
	Layer string           `json:"layer"`
	Plans []FileSystemSync `json:"file-systems"`
}

// FileSystemSync is the Table 1 merge of one file system.
type FileSystemSync struct {
	Partition int                `json:"partition"`
	Plan      *files.SyncPlan    `json:"plan"`
	Applied   *files.ApplyReport `json:"applied"`
}

// SyncMergeLayers merges by files what changed from layer base to layer
// there (another device's check-in) into layer here (this device's), by the
// seed's Table 1 (files.SyncMerge): the result is sealed as a new version
// layer on here. Conflicted copies are named for device at when. Every file
// system of here must be an ext4 file system that base and there hold at the
// same partition (else files.ErrNoFileSystem, and nothing is made); each
// written one is judged by e2fsck.
func SyncMergeLayers(ctx context.Context, st *images.Store, base, here, there, device string, when time.Time) (*UserMerge, error) {
	var ms [3][]files.FileSystem
	for i, id := range []string{base, here, there} {
		m, err := layerManifest(ctx, st, id)
		if err != nil {
			return nil, fmt.Errorf("manifest of %s: %w", images.ShortID(id), err)
		}
		ms[i] = m
	}
	um := &UserMerge{}
	for _, h := range ms[1] {
		b, t := fsAt(ms[0], h.Partition), fsAt(ms[2], h.Partition)
		if b == nil || t == nil {
			return nil, fmt.Errorf("partition %d: %w in every version", h.Partition, files.ErrNoFileSystem)
		}
		if h.Type != "ext4" || b.Type != "ext4" || t.Type != "ext4" {
			return nil, fmt.Errorf("partition %d: a %s file system: %w (the merge writes ext4 only)", h.Partition, h.Type, files.ErrNoFileSystem)
		}
		if h.NeedsRecovery || t.NeedsRecovery {
			return nil, fmt.Errorf("partition %d: %w: a file system whose journal needs recovery", h.Partition, files.ErrCorrupt)
		}
		um.Plans = append(um.Plans, FileSystemSync{Partition: h.Partition, Plan: files.SyncMerge(b.Files, h.Files, t.Files, device, when)})
	}
	src, err := st.OpenLayer(there, false)
	if err != nil {
		return nil, err
	}
	defer src.Close()
	tmp := st.Path(images.DesktopsDir + "/" + proc.TempPrefix() + "user-merge-" + randSuffix() + ".qcow2")
	defer os.Remove(tmp)
	info := src.Info()
	if err := disk.CreateFile(tmp, disk.CreateOptions{Size: src.Size(), ClusterSize: info.ClusterSize,
		BackingFile: st.LayerPath(here), BackingFormat: disk.FormatQcow2, AllowedRoots: []string{st.Dir()}}); err != nil {
		return nil, fmt.Errorf("merge layer: %w", err)
	}
	for i, p := range um.Plans {
		h, t := fsAt(ms[1], p.Partition), fsAt(ms[2], p.Partition)
		rep, err := files.Apply(ctx, files.Source{Img: src, Start: t.Start, Size: t.Size},
			files.Target{Path: tmp, Start: h.Start, Size: h.Size}, p.Plan.Ops)
		if err != nil {
			return nil, fmt.Errorf("partition %d: %w", p.Partition, err)
		}
		um.Plans[i].Applied = rep
	}
	l, _, err := st.Seal(ctx, tmp, images.ImportOptions{Kind: images.KindVersion})
	if err != nil {
		return nil, fmt.Errorf("seal the merged tree: %w", err)
	}
	um.Layer = l.ID
	return um, nil
}

// fsAt is the file system of partition n in fss (nil if none).
func fsAt(fss []files.FileSystem, n int) *files.FileSystem {
	for i := range fss {
		if fss[i].Partition == n {
			return &fss[i]
		}
	}
	return nil
}
