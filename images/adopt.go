package images

import (
	"context"
	"errors"
	"fmt"
	"io"
	"iter"
	"os"
	"path/filepath"
	"strings"

	"github.com/cvd-project/cvd/disk"
	"github.com/cvd-project/cvd/internal/fsutil"
)

// ErrNotAdoptable: a file that Adopt cannot take as it is (outside the store, not
// clean, a backing file name that does not work from the layers directory). The
// caller can copy it with Import or Seal instead.
var ErrNotAdoptable = errors.New("cannot be adopted in place")

// ErrIDMismatch: a file whose content does not have the layer ID the caller
// expected.
var ErrIDMismatch = errors.New("layer ID differs from the expected one")

// AdoptOptions controls Adopt.
type AdoptOptions struct {
	ImportOptions
	// WantID, when set, is the ID the caller expects; a file whose content has
	// another one is refused with ErrIDMismatch and left as it was.
	WantID string
	// Sums, when set, lists the file's clusters as SumLayer would (ascending,
	// zero clusters only for a layer with a parent), hashed by the caller from
	// the same bytes it wrote or read: Adopt then checks that the list covers
	// exactly what the file allocates, and computes the ID from it instead of
	// reading and hashing the data again.
	Sums iter.Seq[ClusterSum]
	// RewriteBacking lets Adopt rewrite the file's backing file name so that it
	// names the parent from the layers directory. The file then no longer opens
	// from where it is: set it only for a file the caller gives away.
	RewriteBacking bool
}

// Adopt makes the qcow2 file at path, written inside the store, a sealed layer
// without copying its data: the layer file is a second name (a hard link) of the
// same file, which Adopt makes read-only. The caller then removes path or renames
// something else over it, and must not write to it again. When the store holds a
// layer of that content already, nothing is linked and existed is true.
//
// The file must be on the store's file system, check clean (no corruption, no
// leaked clusters: the store's layers stay clean) and, when it has a backing
// file, name its parent layer in a way that also holds from the layers directory:
// "<parent>.qcow2" or "../layers/<parent>.qcow2", which is what a top in any
// direct subdirectory of the store has (see RewriteBacking for others). The ID is
// computed from the file's content, as Seal does; the file is synced before the
// record is committed. A crash before that commit leaves path as it was (only
// read-only), and the store's recovery drops the half-made layer.
//
// Kind defaults to version for a file with a parent and base without one.
func (s *Store) Adopt(ctx context.Context, path string, opts AdoptOptions) (*Layer, bool, error) {
	abs, err := s.newLayerPath(path, opts.Names)
	if err != nil {
		return nil, false, err
	}
	fail := func(err error) (*Layer, bool, error) { return nil, false, fmt.Errorf("adopt %s: %w", path, err) }
	if rel, err := filepath.Rel(s.dir, abs); err != nil || rel == "." || strings.HasPrefix(rel, "..") {
		return fail(fmt.Errorf("%w: it is not inside the store %s", ErrNotAdoptable, s.dir))
	}
	fi, err := os.Lstat(abs)
	if err != nil {
		return fail(err)
	}
	if !fi.Mode().IsRegular() {
		return fail(fmt.Errorf("%w: not a regular file", ErrNotAdoptable))
	}
	mode := fi.Mode().Perm()

	img, err := disk.Open(abs, disk.OpenOptions{ReadOnly: true, NoBacking: true})
	if err != nil {
		return fail(err)
	}
	defer img.Close()
	info := img.Info()
	if info.Format != disk.FormatQcow2 {
		return fail(fmt.Errorf("%w: a %s file (the store keeps qcow2 layers)", ErrNotAdoptable, info.Format))
	}
	parent, err := s.findParent(abs, info, opts.Parent, false)
	if err != nil {
		return fail(err)
	}
	kind, err := kindFor(opts.Kind, KindVersion, parent)
	if err != nil {
		return fail(err)
	}
	rewrite := false
	if parent != nil {
		if info.BackingFormat != disk.FormatQcow2 {
			rewrite = true
		} else if id, ok := s.layerForBacking(s.LayerPath("x"), info.BackingName); !ok || id != parent.ID {
			rewrite = true
		}
		if rewrite && !opts.RewriteBacking {
			return fail(fmt.Errorf("%w: its backing file name %q does not name the parent from the layers directory", ErrNotAdoptable, info.BackingName))
		}
	} else if info.BackingName != "" {
		return fail(fmt.Errorf("%w: it has a backing file but no parent layer", ErrNotAdoptable))
	}
	cr, err := disk.Check(abs, false)
	if err != nil {
		return fail(err)
	}
	if cr.Corruptions > 0 || cr.Leaks > 0 || cr.CheckErrors > 0 {
		return fail(fmt.Errorf("%w: check found %d corruptions, %d leaked clusters, %d errors", ErrNotAdoptable, cr.Corruptions, cr.Leaks, cr.CheckErrors))
	}
	parentID := ""
	if parent != nil {
		parentID = parent.ID
	}
	var id string
	var stats LayerStats
	if opts.Sums != nil {
		id, stats, err = idFromSums(img, parentID, opts.Sums)
	} else {
		id, stats, err = ComputeID(ctx, img, parentID)
	}
	if err != nil {
		return fail(err)
	}
	if opts.WantID != "" && id != opts.WantID {
		return fail(fmt.Errorf("%w: it has ID %s, expected %s", ErrIDMismatch, shortID(id), shortID(opts.WantID)))
	}
	cs := DigestClusterSize(info)
	size := img.Size()
	img.Close()

	placed := false
	l, existed, err := s.commitLayerWith(id, parent, kind, size, cs, stats, abs, opts.ImportOptions,
		func(final string) error {
			if err := os.Link(abs, final); err != nil {
				return err
			}
			placed = true
			if rewrite {
				if err := disk.SetBacking(final, parentID+".qcow2", disk.FormatQcow2); err != nil {
					return err
				}
			}
			if err := os.Chmod(final, 0o444); err != nil {
				return err
			}
			return fsutil.Sync(final)
		},
		func() {})
	if err != nil {
		if placed && !rewrite {
			os.Chmod(abs, mode) // the same file: writable again, as it was
		}
		return fail(err)
	}
	return l, existed, nil
}

// idFromSums computes the ID of img's layer from a caller's list of its clusters,
// after checking the list against the layer's allocation: every listed cluster is
// allocated (a listed data cluster as data), and every allocated cluster is listed,
// except, without a parent, clusters that read as zeros (read to be sure when the
// file maps them as data).
func idFromSums(img disk.Image, parent string, sums iter.Seq[ClusterSum]) (string, LayerStats, error) {
	cs := DigestClusterSize(img.Info())
	c, size := int64(cs), img.Size()
	h := NewIDHasher(parent, size, cs)
	next, stop := iter.Pull(sums)
	defer stop()
	cur, ok := next()
	last := int64(-1)
	take := func() {
		h.AddSum(cur)
		last = cur.Index
		cur, ok = next()
	}
	bad := func(f string, a ...any) error {
		return fmt.Errorf("%w: the cluster list does not match the file: %s", ErrIDMismatch, fmt.Sprintf(f, a...))
	}
	var buf []byte
	for win := int64(0); win < size; win += mapWindow {
		runs, err := LayerRuns(img, win, min(mapWindow, size-win), c)
		if err != nil {
			return "", LayerStats{}, err
		}
		for _, r := range runs {
			for i := r.First; i <= r.Last; {
				if ok && cur.Index <= last {
					return "", LayerStats{}, bad("cluster %d listed out of order", cur.Index)
				}
				if ok && cur.Index < i {
					return "", LayerStats{}, bad("cluster %d is listed but not allocated", cur.Index)
				}
				if ok && cur.Index == i {
					if cur.Zero && parent == "" {
						return "", LayerStats{}, bad("cluster %d is listed as zero in a layer without a parent", i)
					}
					if !cur.Zero && !r.Data {
						return "", LayerStats{}, bad("cluster %d is listed as data but is a zero cluster", i)
					}
					if !cur.Zero && int64(cur.Len) != min(c, size-i*c) {
						return "", LayerStats{}, bad("cluster %d is listed with %d bytes", i, cur.Len)
					}
					take()
					i++
					continue
				}
				// Allocated, not listed: only a zero-reading cluster of a layer
				// without a parent. A zero run is skipped whole.
				if parent != "" {
					return "", LayerStats{}, bad("cluster %d is allocated but not listed", i)
				}
				if !r.Data {
					i = r.Last + 1
					if ok && cur.Index <= r.Last {
						i = cur.Index
					}
					continue
				}
				n := min(c, size-i*c)
				if buf == nil {
					buf = make([]byte, c)
				}
				if _, err := img.ReadAt(buf[:n], i*c); err != nil && err != io.EOF {
					return "", LayerStats{}, err
				}
				if !isZero(buf[:n]) {
					return "", LayerStats{}, bad("cluster %d holds data but is not listed", i)
				}
				i++
			}
		}
	}
	if ok {
		return "", LayerStats{}, bad("cluster %d is listed but not allocated", cur.Index)
	}
	return h.Sum(), h.Stats(), nil
}
