package overlay

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/cvd-project/cvd/disk"
	"github.com/cvd-project/cvd/internal/fsutil"
	"github.com/cvd-project/cvd/internal/proc"
)

// ErrSealed: an operation would have to write into a sealed layer.
var ErrSealed = errors.New("layer is sealed")

// CommitOptions controls Commit.
type CommitOptions struct {
	// Into is the layer of top's chain that receives top's content (a path that
	// names the same file as one of the layers); empty means top's backing file.
	Into string
	// Output is the path of the new layer made when the target is sealed; empty
	// means "<top without .qcow2>.commit.qcow2" beside top. It must not exist.
	Output string
	// Sealed reports layers that must never be written (the store's layers). A
	// read-only file (no write permission bit) is always sealed.
	Sealed func(path string) bool
	// AllowedRoots are where top's backing chain may resolve (disk.OpenOptions).
	AllowedRoots []string
}

// CommitReport says what Commit did.
type CommitReport struct {
	Top    string `json:"top"`
	Target string `json:"target"`
	// Sealed: the target was sealed, so a new layer on it, NewLayer, received the
	// content instead; top now stands on NewLayer.
	Sealed   bool   `json:"sealed"`
	NewLayer string `json:"new-layer,omitempty"`
	// Merged is how many layers (top and those between it and the target) were
	// merged. The layers between are left as they are.
	Merged       int     `json:"layers-merged"`
	ClusterSize  int64   `json:"cluster-size"`
	Compared     int64   `json:"clusters-compared"`
	Copied       int64   `json:"clusters-copied"`
	Zeroed       int64   `json:"clusters-zeroed"`
	BytesRead    int64   `json:"bytes-read"`
	BytesWritten int64   `json:"bytes-written"`
	Seconds      float64 `json:"seconds"`
}

// Commit merges the content of the qcow2 image at top, and of every layer between
// it and the target, into the target (top's backing file, or opts.Into), and
// leaves top as an empty overlay on it: the guest view of top stays the same.
// Only clusters whose content in top's view differs from the target's are
// written.
//
// A sealed target is never written: a new layer on it (opts.Output) receives the
// content, and top is left empty on that new layer.
//
// A crash leaves top's guest view as it was: the target receives only content
// that top hides, and top is replaced by its empty successor with one rename.
// Other images that stand on a writable target see it change, as with qemu-img
// commit.
func Commit(ctx context.Context, top string, opts CommitOptions) (rep *CommitReport, err error) {
	start := time.Now()
	rep = &CommitReport{Top: top}
	roots := opts.AllowedRoots
	if len(roots) == 0 {
		roots = []string{filepath.Dir(absPath(top))}
	}
	if isSealed(top, opts.Sealed) {
		return nil, fmt.Errorf("commit %s: %w: it would be left empty", top, ErrSealed)
	}
	t, err := disk.Open(top, disk.OpenOptions{ReadOnly: true, AllowedRoots: roots})
	if err != nil {
		return nil, fmt.Errorf("commit %s: %w", top, err)
	}
	defer func() {
		if t != nil {
			t.Close()
		}
	}()
	if t.Info().Format != disk.FormatQcow2 {
		return nil, fmt.Errorf("commit %s: a %s image has no backing file", top, t.Info().Format)
	}
	layers := disk.Layers(t)
	if len(layers) < 2 {
		return nil, fmt.Errorf("commit %s: it has no backing file to commit into", top)
	}
	k := 1
	if opts.Into != "" {
		k = -1
		want := pathKey(opts.Into)
		for i, l := range layers {
			if layerKey(l).same(want) {
				k = i
				break
			}
		}
		switch {
		case k < 0:
			return nil, fmt.Errorf("commit %s: %s is not in its backing chain", top, opts.Into)
		case k == 0:
			return nil, fmt.Errorf("commit %s: cannot commit an image into itself", top)
		}
	}
	target := layers[k]
	ti := target.Info()
	rep.Target, rep.Merged = ti.Path, k
	rep.Sealed = isSealed(ti.Path, opts.Sealed)

	// dest is the image that receives the content: the target itself, or a new
	// layer on it.
	var dest disk.Image
	var tmp string
	if rep.Sealed {
		out := opts.Output
		if out == "" {
			out = strings.TrimSuffix(top, ".qcow2") + ".commit.qcow2"
		}
		if _, err := os.Lstat(out); err == nil {
			return nil, fmt.Errorf("commit %s: %s exists", top, out)
		}
		rep.NewLayer = out
		tmp = tempName(out)
		dest, err = CreateTemp(tmp, disk.CreateOptions{Size: t.Size(), ClusterSize: t.Info().ClusterSize,
			BackingFile: ti.Path, BackingFormat: ti.Format, AllowedRoots: roots})
		if err != nil {
			return nil, fmt.Errorf("commit %s: new layer: %w", top, err)
		}
	} else {
		if target.Size() < t.Size() {
			return nil, fmt.Errorf("commit %s: the target %s (%d bytes) is smaller than the top (%d bytes)", top, ti.Path, target.Size(), t.Size())
		}
		dest, err = disk.Open(ti.Path, disk.OpenOptions{Format: ti.Format, AllowedRoots: roots})
		if err != nil {
			return nil, fmt.Errorf("commit %s: open target: %w", top, err)
		}
	}
	destClosed := false
	defer func() {
		if !destClosed {
			dest.Close()
		}
		if err != nil && tmp != "" {
			os.Remove(tmp)
		}
	}()

	// Compare top's view with the target's: a pair whose shared part is the
	// target and what lies below it.
	g := int64(max(dest.Info().ClusterSize, 512))
	rep.ClusterSize = g
	p := newPair(t, target)
	w := &runWriter{img: dest, direct: rep.Sealed} // a new temporary layer, or the target in place
	st, err := p.compare(ctx, g, t.Size(), nil, func(res *chunkResult) error {
		for i, d := range res.diffs {
			if res.aZero[i] {
				rep.Zeroed++
				if err := w.add(d, nil); err != nil {
					return err
				}
				continue
			}
			rep.Copied++
			rep.BytesWritten += d.Len
			if err := w.add(d, res.aData[d.Off-res.r.Off:d.End()-res.r.Off]); err != nil {
				return err
			}
		}
		return nil
	})
	if err == nil {
		err = w.flush()
	}
	rep.Compared, rep.BytesRead = st.Candidates, st.Read
	if err != nil {
		return nil, fmt.Errorf("commit %s into %s: %w", top, ti.Path, err)
	}
	if err := dest.Flush(); err != nil {
		return nil, fmt.Errorf("commit %s: %w", top, err)
	}
	destClosed = true
	if err := dest.Close(); err != nil {
		return nil, fmt.Errorf("commit %s: %w", top, err)
	}
	newBacking, newFormat := ti.Path, ti.Format
	if rep.Sealed {
		if err := renameSynced(tmp, rep.NewLayer); err != nil {
			return nil, fmt.Errorf("commit %s: %w", top, err)
		}
		tmp = ""
		newBacking, newFormat = rep.NewLayer, disk.FormatQcow2
	}

	// Replace top by an empty overlay on what now holds its content.
	info := t.Info()
	size := t.Size()
	t.Close()
	t = nil
	if err := replaceWithEmpty(top, info, size, newBacking, newFormat, roots); err != nil {
		return nil, fmt.Errorf("commit %s: %w", top, err)
	}
	rep.Seconds = time.Since(start).Seconds()
	return rep, nil
}

// replaceWithEmpty atomically replaces the image at top with an empty qcow2
// overlay of the same size and cluster size on backing.
func replaceWithEmpty(top string, info disk.Info, size int64, backing string, format disk.Format, roots []string) error {
	tmp := tempName(top)
	comp := info.Compression
	if comp == "deflate" {
		comp = ""
	}
	err := disk.CreateFile(tmp, disk.CreateOptions{Size: size, ClusterSize: info.ClusterSize, BackingFile: backing,
		BackingFormat: format, Compression: comp, AllowedRoots: roots})
	if err != nil {
		return fmt.Errorf("new empty top: %w", err)
	}
	if fi, err := os.Stat(top); err == nil {
		os.Chmod(tmp, fi.Mode().Perm())
	}
	if err := renameSynced(tmp, top); err != nil {
		os.Remove(tmp)
		return err
	}
	return nil
}

// isSealed: no write permission bit, or the caller says so.
func isSealed(path string, sealed func(string) bool) bool {
	if sealed != nil && sealed(path) {
		return true
	}
	fi, err := os.Stat(path)
	return err == nil && fi.Mode().Perm()&0o222 == 0
}

// tempName is a fresh temporary name beside path.
func tempName(path string) string {
	var b [6]byte
	rand.Read(b[:])
	return filepath.Join(filepath.Dir(path), proc.TempPrefix()+filepath.Base(path)+"-"+hex.EncodeToString(b[:]))
}

// renameSynced renames a synced file into place and syncs the directory.
func renameSynced(from, to string) error {
	f, err := os.OpenFile(from, os.O_RDWR, 0)
	if err != nil {
		return err
	}
	err = f.Sync()
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return err
	}
	if err := os.Rename(from, to); err != nil {
		return err
	}
	return fsutil.Sync(filepath.Dir(to))
}

// CreateTemp creates a qcow2 file that is renamed into place (or thrown away)
// after it is complete, and opens it without write barriers: a crash leaves only
// a temporary file to delete.
func CreateTemp(path string, co disk.CreateOptions) (disk.Image, error) {
	if err := disk.CreateFile(path, co); err != nil {
		return nil, err
	}
	img, err := disk.Open(path, disk.OpenOptions{Format: disk.FormatQcow2, AllowedRoots: co.AllowedRoots, NoBarriers: true})
	if err != nil {
		os.Remove(path)
		return nil, err
	}
	return img, nil
}

// CopyExtents copies into dst what the layers own allocate, as the guest sees it
// through view: data as data, ranges that read as zeros as zero clusters. Partial
// clusters of dst take the rest from dst's backing chain (copy-on-write). It
// returns the data bytes written.
func CopyExtents(ctx context.Context, view disk.Image, own []disk.Image, dst disk.Image) (int64, error) {
	var s RangeSet
	for _, l := range own {
		exts, err := l.MapLayer(0, min(l.Size(), dst.Size()))
		if err != nil {
			return 0, fmt.Errorf("map %s: %w", l.Info().Path, err)
		}
		for _, e := range exts {
			if e.State != disk.Unallocated {
				s.Add(e.Off, e.Len)
			}
		}
	}
	s = s.Normalize()
	w := &runWriter{img: dst, direct: true} // dst is a temporary file
	buf := make([]byte, chunkSize)
	var written int64
	for _, r := range s {
		for off := r.Off; off < r.End(); {
			if err := ctx.Err(); err != nil {
				return written, err
			}
			n := min(int64(len(buf)), r.End()-off)
			b := buf[:n]
			if err := disk.ReadView(view, b, off); err != nil {
				return written, err
			}
			var err error
			if isZero(b) {
				err = w.add(Range{off, n}, nil)
			} else {
				err = w.add(Range{off, n}, b)
				written += n
			}
			if err != nil {
				return written, err
			}
			off += n
		}
	}
	if err := w.flush(); err != nil {
		return written, err
	}
	return written, dst.Flush()
}
