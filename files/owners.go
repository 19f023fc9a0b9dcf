package files

import (
	"context"
	"errors"
	"fmt"
	"sort"

	"github.com/cvd-project/cvd/disk"
)

// FileHit is a file (or directory) of a file system whose blocks lie in
// ranges FilesIn was asked about, and how many of its bytes do.
type FileHit struct {
	Partition int    `json:"partition"`
	Path      string `json:"path"`
	Type      string `json:"type"`
	Bytes     int64  `json:"bytes"`
}

// maxHits bounds what FilesIn returns.
const maxHits = 10000

// FilesIn names the files and directories of the disk's ext4 file systems
// whose data blocks lie in ranges (sorted, not overlapping), with the bytes
// that do: which files a set of clusters holds. It reads the directory tree
// and each inode's extent tree (cvd's own parser); files stored inline or
// without an extent tree hold no blocks of their own and are not named.
// At most maxHits files are returned, the most bytes first.
func FilesIn(ctx context.Context, img disk.Image, ranges []Range) (out []FileHit, err error) {
	defer func() {
		if p := recover(); p != nil {
			out, err = nil, fmt.Errorf("%s: %w: %v", img.Info().Path, ErrCorrupt, p)
		}
	}()
	st := newStorage(img)
	found := false
	for _, r := range regions(st) {
		g, err := readGeometry(ctx, st, r.start, r.size)
		if errors.Is(err, errNotExt4) {
			continue
		} else if err != nil {
			return nil, fmt.Errorf("%s: partition %d: %w", img.Info().Path, r.n, err)
		}
		fsys, err := openExt4(ctx, st, r.start, r.size)
		if err != nil {
			continue
		}
		found = true
		w := walker{fsys: fsys, seen: map[uint32]bool{}, inodes: map[string]uint32{}, g: g}
		var ents []Entry
		if err := w.walk(ctx, "/", 0, &ents); err != nil {
			return nil, fmt.Errorf("partition %d: %w", r.n, err)
		}
		for _, e := range ents {
			if e.Type != "file" && e.Type != "dir" {
				continue
			}
			if err := ctx.Err(); err != nil {
				return nil, err
			}
			ino, ok := w.inodes[e.Path]
			if e.Path == "/" {
				ino, ok = 2, true
			}
			if !ok {
				continue
			}
			ext, err := g.fileExtents(int64(ino), "")
			if errors.Is(err, ErrUnsupportedFS) {
				continue // inline data, or no extent tree
			}
			if err != nil {
				return nil, fmt.Errorf("partition %d: %s: %w", r.n, e.Path, err)
			}
			if n := overlap(ext, ranges); n > 0 {
				out = append(out, FileHit{Partition: r.n, Path: e.Path, Type: e.Type, Bytes: n})
			}
		}
	}
	if !found {
		return nil, fmt.Errorf("%s: %w", img.Info().Path, ErrNoFileSystem)
	}
	sort.SliceStable(out, func(i, j int) bool { return out[i].Bytes > out[j].Bytes })
	if len(out) > maxHits {
		out = out[:maxHits]
	}
	return out, nil
}

// overlap counts the bytes of ext that lie in rs (sorted, not overlapping).
func overlap(ext, rs []Range) int64 {
	var n int64
	for _, e := range ext {
		i := sort.Search(len(rs), func(i int) bool { return rs[i].End() > e.Off })
		for ; i < len(rs) && rs[i].Off < e.End(); i++ {
			n += min(e.End(), rs[i].End()) - max(e.Off, rs[i].Off)
		}
	}
	return n
}
