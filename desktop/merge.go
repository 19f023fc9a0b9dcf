package desktop

import (
	"context"
	"errors"
	"fmt"
	"os"

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
	byPart := func(fss []files.FileSystem, n int) *files.FileSystem {
		for i := range fss {
			if fss[i].Partition == n {
				return &fss[i]
			}
		}
		return nil
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
		n := byPart(neu, fs.Partition)
		if n == nil {
			p.Refused = fmt.Sprintf("policy merge refused: the new layers have no ext4 file system at partition %d", fs.Partition)
			p.Files = nil
			return nil
		}
		var base []files.Entry
		if o := byPart(old, fs.Partition); o != nil {
			base = o.Files
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
