package desktop

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"strings"
	"sync"

	"github.com/cvd-project/cvd/disk"
	"github.com/cvd-project/cvd/files"
	"github.com/cvd-project/cvd/overlay"
)

// metaOnce is a disk's file-system metadata, read once.
type metaOnce struct {
	once    sync.Once
	ranges  []files.Range
	unknown string // why the metadata could not be placed; "" when it was (or there is no file system)
}

func (m *metaOnce) get(ctx context.Context, img disk.Image) ([]files.Range, string) {
	m.once.Do(func() { m.ranges, m.unknown = readMetadata(ctx, img) })
	return m.ranges, m.unknown
}

// readMetadata is files.Metadata, with "no file system" as nothing and any
// other failure as unknown.
func readMetadata(ctx context.Context, img disk.Image) ([]files.Range, string) {
	rs, err := files.Metadata(ctx, img)
	switch {
	case err == nil:
		return rs, ""
	case errors.Is(err, files.ErrNoFileSystem):
		return nil, ""
	default:
		return nil, err.Error()
	}
}

// metadataConflicts fills p's metadata conflicts: the parts of conf that hold
// ext4 metadata in the desktop's disk (top, the whole chain) or in the new
// layers.
func (pl *planner) metadataConflicts(ctx context.Context, top disk.Image, conf overlay.RangeSet, p *DesktopPlan) {
	own, unknown := readMetadata(ctx, top)
	neu, unknownNew := pl.newMeta.get(ctx, pl.newImg)
	p.MetadataUnknown = unknown
	if p.MetadataUnknown == "" {
		p.MetadataUnknown = unknownNew
	}
	meta := append(append([]files.Range{}, own...), neu...)
	sort.Slice(meta, func(i, j int) bool { return meta[i].Off < meta[j].Off })
	for _, c := range conf {
		for _, m := range meta {
			lo, hi := max(c.Off, m.Off), min(c.End(), m.End())
			if lo >= hi {
				continue
			}
			if n := len(p.MetadataConflicts); n > 0 && p.MetadataConflicts[n-1].End() >= hi && p.MetadataConflicts[n-1].Off <= lo {
				continue // the other disk names the same blocks
			}
			p.MetadataConflicts = append(p.MetadataConflicts, files.Range{Off: lo, Len: hi - lo, What: m.What})
			p.MetadataConflictBytes += hi - lo
		}
	}
}

// metadataKinds names what the ranges hold: "superblock, inode table".
func metadataKinds(rs []files.Range) string {
	seen := map[string]bool{}
	var out []string
	for _, r := range rs {
		if !seen[r.What] {
			seen[r.What] = true
			out = append(out, r.What)
		}
	}
	return strings.Join(out, ", ")
}

// ConflictFile is a file whose blocks lie in a desktop's conflicts: in its
// own disk, in the new layers, or both (the bytes on each side).
type ConflictFile struct {
	Partition    int    `json:"partition"`
	Path         string `json:"path"`
	Type         string `json:"type"`
	DesktopBytes int64  `json:"desktop-bytes,omitempty"`
	LayerBytes   int64  `json:"layer-bytes,omitempty"`
}

// conflictFiles fills p's conflicts as files: those of the desktop's disk
// (top, the whole chain) and of the new layers whose blocks the conflicts
// hold. A disk whose files cannot be read names none (the metadata report
// says why).
func (pl *planner) conflictFiles(ctx context.Context, top disk.Image, conf overlay.RangeSet, p *DesktopPlan) {
	rs := make([]files.Range, len(conf))
	for i, c := range conf {
		rs[i] = files.Range{Off: c.Off, Len: c.Len}
	}
	byPath := map[string]*ConflictFile{}
	var order []string
	for side, img := range []disk.Image{top, pl.newImg} {
		hits, err := files.FilesIn(ctx, img, rs)
		if err != nil {
			continue
		}
		for _, h := range hits {
			k := fmt.Sprint(h.Partition) + h.Path
			f := byPath[k]
			if f == nil {
				f = &ConflictFile{Partition: h.Partition, Path: h.Path, Type: h.Type}
				byPath[k] = f
				order = append(order, k)
			}
			if side == 0 {
				f.DesktopBytes += h.Bytes
			} else {
				f.LayerBytes += h.Bytes
			}
		}
	}
	for _, k := range order {
		p.ConflictFiles = append(p.ConflictFiles, *byPath[k])
	}
}
