package overlay

import (
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"time"

	"github.com/cvd-project/cvd/disk"
)

// RebaseOptions controls Rebase.
type RebaseOptions struct {
	// Unsafe only rewrites the backing file name and format: the guest view of
	// the top changes wherever the old and new chains differ.
	Unsafe bool
	// AllowedRoots are where the top's old backing chain and the new backing
	// chain may resolve (see disk.OpenOptions). Empty: the directories of the top
	// and of the new backing file.
	AllowedRoots []string
	// Sealed reports layers that must never be written (the store's layers); a
	// read-only file is always sealed. A sealed top is refused.
	Sealed func(path string) bool
	// InPlace always writes into the top's file, with the engine's ordered
	// metadata updates. Otherwise a top whose file is no larger than what the
	// differing layers hold is rebuilt beside itself and renamed into place.
	InPlace bool
	// Progress, when set, is called with the candidate clusters done (in guest
	// bytes) after each chunk. The total is not known in advance: it is -1.
	Progress func(done, total int64)
}

// RebaseReport says what a rebase did.
type RebaseReport struct {
	Top           string      `json:"top"`
	OldBacking    string      `json:"old-backing,omitempty"`
	NewBacking    string      `json:"new-backing,omitempty"`
	BackingName   string      `json:"backing-name,omitempty"` // as recorded in the top
	BackingFormat disk.Format `json:"backing-format,omitempty"`
	Unsafe        bool        `json:"unsafe"`
	// Rebuilt: the top was small, so it was rebuilt beside itself (a copy, the
	// clusters, one sync) and renamed into place.
	Rebuilt     bool  `json:"rebuilt"`
	ClusterSize int64 `json:"cluster-size"`
	// SharedLayers is how many layers the old and new chains share (never read).
	SharedLayers int `json:"shared-layers"`
	// Compared: clusters that a layer of only one chain allocates and the top
	// does not; each was compared between the old and new chains.
	Compared int64 `json:"clusters-compared"`
	// Copied: clusters whose old content differs from the new chain's and was
	// written into the top as data; Zeroed: those written as zero clusters
	// (the old content was all zeros), without data.
	Copied       int64   `json:"clusters-copied"`
	Zeroed       int64   `json:"clusters-zeroed"`
	BytesRead    int64   `json:"bytes-read"`
	BytesWritten int64   `json:"bytes-written"` // guest data bytes written into the top
	FileBefore   int64   `json:"file-size-before"`
	FileAfter    int64   `json:"file-size-after"`
	Seconds      float64 `json:"seconds"`
}

// Growth is how many bytes the top's file grew.
func (r *RebaseReport) Growth() int64 { return r.FileAfter - r.FileBefore }

// Rebase changes the backing file of the qcow2 image at top to newBacking ("" for
// none), keeping what the guest sees in top byte for byte (a safe rebase), and
// records the new backing file relative to top's directory with its format.
//
// Only clusters that a layer of the old chain or of the new chain alone allocates
// (layers both chains hold are skipped) and that top does not allocate itself are
// compared; of those, only clusters whose content differs are written into top:
// as data, or as a zero cluster when the old content is all zeros. The work
// follows the clusters the differing layers hold, never the virtual size.
//
// A crash leaves top on its old backing file with the same guest view (the
// clusters copied so far read the same through either chain) and no corruption;
// running Rebase again finishes the job. No layer other than top is written. A
// top no larger than what the differing layers hold is rebuilt beside itself (a
// ".tmp-" file a crash may leave behind) and renamed into place: the top's file
// is then a new file with the same mode.
func Rebase(ctx context.Context, top, newBacking string, opts RebaseOptions) (rep *RebaseReport, err error) {
	start := time.Now()
	rep = &RebaseReport{Top: top, Unsafe: opts.Unsafe}
	roots := opts.AllowedRoots
	if len(roots) == 0 {
		roots = []string{filepath.Dir(absPath(top))}
		if newBacking != "" {
			roots = append(roots, filepath.Dir(absPath(newBacking)))
		}
	}
	f, err := disk.Probe(top)
	if err != nil {
		return nil, fmt.Errorf("rebase %s: %w", top, err)
	}
	if isSealed(top, opts.Sealed) {
		return nil, fmt.Errorf("rebase %s: %w: rebase a copy, or an overlay on it", top, ErrSealed)
	}
	if f != disk.FormatQcow2 {
		return nil, fmt.Errorf("rebase %s: a %s image has no backing file (only qcow2 does)", top, f)
	}

	var nb disk.Image
	if newBacking != "" {
		if nb, err = disk.Open(newBacking, disk.OpenOptions{ReadOnly: true, AllowedRoots: roots}); err != nil {
			return nil, fmt.Errorf("rebase %s: new backing: %w", top, err)
		}
		defer func() {
			if cerr := nb.Close(); err == nil && cerr != nil {
				err = cerr
			}
		}()
		tk := pathKey(top)
		for _, l := range disk.Layers(nb) {
			if layerKey(l).same(tk) {
				return nil, fmt.Errorf("rebase %s onto %s: %w: the new chain contains the top", top, newBacking, disk.ErrBackingLoop)
			}
		}
		rep.NewBacking = nb.Info().Path
		rep.BackingFormat = nb.Info().Format
		rep.BackingName = backingName(top, newBacking)
	}

	t, err := disk.Open(top, disk.OpenOptions{ReadOnly: true, AllowedRoots: roots, Format: disk.FormatQcow2})
	if err != nil {
		return nil, fmt.Errorf("rebase %s: %w", top, err)
	}
	closed := false
	defer func() {
		if !closed {
			t.Close()
		}
	}()
	ti := t.Info()
	rep.ClusterSize = int64(ti.ClusterSize)
	rep.FileBefore = FileSize(top)
	if ob := t.Backing(); ob != nil {
		rep.OldBacking = ob.Info().Path
	}
	target := top // the file that gets the clusters and the new backing name
	if !opts.Unsafe {
		// A top whose file is no larger than what the differing layers hold is
		// rebuilt beside itself without write barriers and renamed into place:
		// the copy costs no more than the comparison, and the writes pay one
		// sync instead of a few per run. A larger top is written in place, with
		// the engine's crash-safe ordering.
		rep.Rebuilt = !opts.InPlace && rep.FileBefore <= ownFileBytes(newPair(t.Backing(), nb))
		closed = true
		t.Close()
		wo := disk.OpenOptions{AllowedRoots: roots, Format: disk.FormatQcow2}
		if rep.Rebuilt {
			target = tempName(top)
			if err := copyFile(top, target); err != nil {
				os.Remove(target)
				return nil, fmt.Errorf("rebase %s: %w", top, err)
			}
			defer func() {
				if err != nil {
					os.Remove(target)
				}
			}()
			wo.NoBarriers = true
		}
		if t, err = disk.Open(target, wo); err != nil {
			return nil, fmt.Errorf("rebase %s: %w", top, err)
		}
		closed = false
		if err := safeCopy(ctx, t, nb, rep, rep.Rebuilt, opts.Progress); err != nil {
			return nil, fmt.Errorf("rebase %s: %w", top, err)
		}
		if err := t.Flush(); err != nil {
			return nil, fmt.Errorf("rebase %s: %w", top, err)
		}
	}
	closed = true
	if err := t.Close(); err != nil {
		return nil, fmt.Errorf("rebase %s: %w", top, err)
	}
	if err := disk.SetBacking(target, rep.BackingName, rep.BackingFormat); err != nil {
		return nil, fmt.Errorf("rebase %s: %w", top, err)
	}
	if target != top {
		if err := renameSynced(target, top); err != nil {
			return nil, fmt.Errorf("rebase %s: %w", top, err)
		}
	}
	rep.FileAfter = FileSize(top)
	rep.Seconds = time.Since(start).Seconds()
	return rep, nil
}

// safeCopy writes into t every cluster that t does not allocate and whose content
// in t's current backing chain differs from the one in nb.
func safeCopy(ctx context.Context, t, nb disk.Image, rep *RebaseReport, direct bool, progress func(done, total int64)) error {
	p := newPair(t.Backing(), nb)
	rep.SharedLayers = len(p.shared)
	g := rep.ClusterSize
	// What the top allocates is its own: it hides both chains. Only the
	// candidate ranges are mapped, not the whole top.
	skip := func(cands RangeSet) (RangeSet, error) {
		var s RangeSet
		for _, c := range cands {
			end := min(c.End(), t.Size())
			if end <= c.Off {
				continue
			}
			exts, err := t.MapLayer(c.Off, end-c.Off)
			if err != nil {
				return nil, err
			}
			for _, e := range exts {
				if e.State != disk.Unallocated {
					s.Add(e.Off, e.Len)
				}
			}
		}
		return s, nil
	}
	w := &runWriter{img: t, direct: direct}
	var done int64
	// Without a backing file, the engine leaves an unallocated cluster as it is on
	// WriteZeroes (it reads as zeros already): such a top gets zero data instead.
	zeroFlag := t.Backing() != nil && t.Info().Version >= 3
	var zbuf []byte
	st, err := p.compare(ctx, g, t.Size(), skip, func(res *chunkResult) error {
		for i, d := range res.diffs {
			if res.aZero[i] && !zeroFlag {
				if int64(len(zbuf)) < d.Len {
					zbuf = make([]byte, d.Len)
				}
				rep.Copied++
				rep.BytesWritten += d.Len
				if err := w.add(d, zbuf[:d.Len]); err != nil {
					return err
				}
				continue
			}
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
		// The writer copied what it keeps; res.aData goes back to the pool.
		done += res.r.Len
		if progress != nil {
			progress(done, -1)
		}
		return nil
	})
	if err == nil {
		err = w.flush()
	}
	rep.Compared, rep.BytesRead = st.Candidates, st.Read
	return err
}

// runWriter gathers the clusters to write, merging contiguous ones into runs of
// data or of zeros, and writes them when they hold maxRun bytes of data (or on
// flush): one WriteAt or WriteZeroes per run, so that a run pays the metadata
// barriers once.
type runWriter struct {
	img disk.Image
	// direct writes each piece at once, without copying it: for images opened
	// without write barriers, where gathering saves nothing.
	direct bool
	runs   []pendingRun
	data   []byte // the data of the data runs, in order
}

type pendingRun struct {
	off, n int64
	zero   bool
	lo     int // data[lo:lo+n] for a data run
}

const maxRun = 32 << 20

func (w *runWriter) add(r Range, data []byte) error {
	if w.direct {
		if data == nil {
			return w.img.WriteZeroes(r.Off, r.Len)
		}
		_, err := w.img.WriteAt(data, r.Off)
		return err
	}
	zero := data == nil
	if k := len(w.runs); k > 0 {
		l := &w.runs[k-1]
		if l.off+l.n == r.Off && l.zero == zero {
			l.n += r.Len
			w.data = append(w.data, data...)
			return w.maybeFlush()
		}
	}
	if w.data == nil {
		w.data = make([]byte, 0, maxRun+chunkSize)
	}
	w.runs = append(w.runs, pendingRun{off: r.Off, n: r.Len, zero: zero, lo: len(w.data)})
	w.data = append(w.data, data...)
	return w.maybeFlush()
}

func (w *runWriter) maybeFlush() error {
	if len(w.data) >= maxRun || len(w.runs) >= 4096 {
		return w.flush()
	}
	return nil
}

func (w *runWriter) flush() error {
	for _, r := range w.runs {
		var err error
		if r.zero {
			err = w.img.WriteZeroes(r.off, r.n)
		} else {
			_, err = w.img.WriteAt(w.data[r.lo:r.lo+int(r.n)], r.off)
		}
		if err != nil {
			return err
		}
	}
	w.runs, w.data = w.runs[:0], w.data[:0]
	return nil
}

// backingName is how top should name backing: relative to top's directory when
// possible.
func backingName(top, backing string) string {
	ab := absPath(backing)
	if rel, err := filepath.Rel(filepath.Dir(absPath(top)), ab); err == nil {
		return rel
	}
	return ab
}

func absPath(p string) string {
	if a, err := filepath.Abs(p); err == nil {
		return a
	}
	return p
}

// FileSize is the size of the file at p, 0 when it cannot be read.
func FileSize(p string) int64 {
	fi, err := os.Stat(p)
	if err != nil {
		return 0
	}
	return fi.Size()
}

// ownFileBytes is the size of the files of the layers of p that are not shared:
// about what they hold, an upper bound of what a rebase between them compares.
func ownFileBytes(p *pair) int64 {
	var n int64
	for _, own := range [][]disk.Image{p.ownA, p.ownB} {
		for _, l := range own {
			n += FileSize(l.Info().Path)
		}
	}
	return n
}

// copyFile copies the file src to dst (which must not exist), with src's mode.
func copyFile(src, dst string) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	fi, err := in.Stat()
	if err != nil {
		return err
	}
	out, err := os.OpenFile(dst, os.O_RDWR|os.O_CREATE|os.O_EXCL, fi.Mode().Perm())
	if err != nil {
		return err
	}
	_, err = io.Copy(out, in) // copy_file_range where the kernel has it
	if cerr := out.Close(); err == nil {
		err = cerr
	}
	return err
}
