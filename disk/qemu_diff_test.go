package disk_test

// Differential tests against QEMU, through the public API only.
//
// QEMU → cvd: images that qemu-img and qemu-io make (v2 and v3, cluster sizes
// 512 B to 2 MiB, chains, zero clusters, discards, deflate and zstd compressed
// clusters, shorter backing files, refcount widths 1 to 64, raw backing files,
// data past 4 GiB) read the same through disk.Open+ReadAt as through
// `qemu-img convert -O raw`, and through go-qcow2reader as a third reader;
// MapChain and MapLayer agree with `qemu-img map --output=json`; Check agrees
// with `qemu-img check`, also on images corrupted on purpose.
//
// cvd → QEMU: images that cvd creates and writes pass `qemu-img check` with no
// errors and no leaks, and `qemu-img compare` finds them identical to a raw
// file that got the same writes (an in-memory model).
//
// Every random choice comes from a seeded generator; the seed is logged and
// CVD_TEST_SEED replaces it.

import (
	"bytes"
	"compress/flate"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"hash/fnv"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/cvd-project/cvd/disk"
	"github.com/cvd-project/cvd/internal/testutil"
	"github.com/klauspost/compress/zstd"
	qcow2reader "github.com/lima-vm/go-qcow2reader"
	qrimage "github.com/lima-vm/go-qcow2reader/image"
	qrqcow2 "github.com/lima-vm/go-qcow2reader/image/qcow2"
)

const (
	qdKiB = int64(1) << 10
	qdMiB = int64(1) << 20
	qdGiB = int64(1) << 30
	qdTiB = int64(1) << 40
)

// ---------------------------------------------------------------------------
// QEMU → cvd

// qdLayer describes one layer that QEMU makes.
type qdLayer struct {
	format   string // "qcow2" (default) or "raw"
	compat   string // "1.1" (default) or "0.10"
	cluster  int64  // default 64 KiB
	refBits  int    // 0: QEMU's default (16)
	size     int64  // 0: the chain's size
	compress string // "zlib" or "zstd": the layer is `qemu-img convert -c` output, then written a little
	ops      int    // random qemu-io operations; 0 means 40
}

func (l qdLayer) fmt() string {
	if l.format == "" {
		return "qcow2"
	}
	return l.format
}

func (l qdLayer) cs() int64 {
	if l.cluster == 0 {
		return 64 * qdKiB
	}
	return l.cluster
}

// qdChain is a chain that QEMU builds, bottom layer first.
type qdChain struct {
	name   string
	size   int64
	layers []qdLayer
	// sample: compare the ranges the operations touched and random ranges
	// instead of the whole disk (large sparse disks).
	sample bool
	// hot: offsets the random operations aim at, besides cluster boundaries.
	hot []int64
}

func TestQemuDiffReadQemuImages(t *testing.T) {
	testutil.NeedQemu(t)
	v2 := func(cs int64) qdLayer { return qdLayer{compat: "0.10", cluster: cs} }
	v3 := func(cs int64) qdLayer { return qdLayer{cluster: cs} }
	tests := []qdChain{
		{name: "v2 64K", size: 8 * qdMiB, layers: []qdLayer{v2(64 * qdKiB)}},
		{name: "v3 64K", size: 8 * qdMiB, layers: []qdLayer{v3(64 * qdKiB)}},
		{name: "v3 512B", size: 2 * qdMiB, layers: []qdLayer{{cluster: 512, ops: 120}}},
		{name: "v2 512B", size: 2 * qdMiB, layers: []qdLayer{{compat: "0.10", cluster: 512, ops: 120}}},
		{name: "v3 4K", size: 8 * qdMiB, layers: []qdLayer{{cluster: 4 * qdKiB, ops: 100}}},
		{name: "v3 2M", size: 40 * qdMiB, layers: []qdLayer{v3(2 * qdMiB)}},
		{name: "v2 2M", size: 40 * qdMiB, layers: []qdLayer{v2(2 * qdMiB)}},
		{name: "v3 64K chain of 3", size: 8 * qdMiB, layers: []qdLayer{v3(64 * qdKiB), v3(64 * qdKiB), v3(64 * qdKiB)}},
		{name: "v2 4K chain of 3", size: 4 * qdMiB, layers: []qdLayer{v2(4 * qdKiB), v2(4 * qdKiB), v2(4 * qdKiB)}},
		{name: "mixed clusters and versions chain of 3", size: 8 * qdMiB, layers: []qdLayer{v3(2 * qdMiB), v2(64 * qdKiB), {cluster: 512, ops: 100}}},
		{name: "four deep on raw", size: 6 * qdMiB, layers: []qdLayer{{format: "raw"}, v3(4 * qdKiB), v2(64 * qdKiB), v3(512)}},
		{name: "zlib compressed", size: 8 * qdMiB, layers: []qdLayer{{compress: "zlib"}}},
		{name: "zstd compressed", size: 8 * qdMiB, layers: []qdLayer{{compress: "zstd"}}},
		{name: "zlib compressed 4K", size: 4 * qdMiB, layers: []qdLayer{{compress: "zlib", cluster: 4 * qdKiB}}},
		{name: "zstd compressed 2M", size: 24 * qdMiB, layers: []qdLayer{{compress: "zstd", cluster: 2 * qdMiB}}},
		{name: "zstd compressed 512B", size: 1 * qdMiB, layers: []qdLayer{{compress: "zstd", cluster: 512}}},
		{name: "v2 zlib compressed", size: 4 * qdMiB, layers: []qdLayer{{compress: "zlib", compat: "0.10"}}},
		{name: "overlay on zstd compressed", size: 8 * qdMiB, layers: []qdLayer{{compress: "zstd"}, v3(64 * qdKiB), v3(4 * qdKiB)}},
		{name: "backing shorter than overlay", size: 8 * qdMiB, layers: []qdLayer{{size: 3*qdMiB + 7*512}, {size: 5 * qdMiB, cluster: 4 * qdKiB}, v3(64 * qdKiB)}},
		{name: "backing longer than overlay", size: 8 * qdMiB, layers: []qdLayer{{size: 9*qdMiB + 12345*512}, v3(4 * qdKiB)}},
		{name: "raw backing shorter", size: 4 * qdMiB, layers: []qdLayer{{format: "raw", size: 1*qdMiB + 7*512}, v3(64 * qdKiB)}},
		{name: "refcount bits 1", size: 8 * qdMiB, layers: []qdLayer{{refBits: 1}}},
		{name: "refcount bits 8", size: 8 * qdMiB, layers: []qdLayer{{refBits: 8, cluster: 4 * qdKiB}}},
		{name: "refcount bits 16", size: 8 * qdMiB, layers: []qdLayer{{refBits: 16}}},
		{name: "refcount bits 64", size: 8 * qdMiB, layers: []qdLayer{{refBits: 64, cluster: 512, ops: 80}}},
		{name: "refcount bits 64 over 1", size: 8 * qdMiB, layers: []qdLayer{{refBits: 1}, {refBits: 64}}},
		{name: "over 4 GiB", size: 6 * qdGiB, sample: true, layers: []qdLayer{v3(64 * qdKiB), v3(64 * qdKiB)},
			hot: []int64{4*qdGiB - 1000, 4 * qdGiB, 4*qdGiB + 64*qdKiB + 3, 5*qdGiB + 12345, 6*qdGiB - 100}},
		{name: "v2 over 4 GiB", size: 5 * qdGiB, sample: true, layers: []qdLayer{v2(2 * qdMiB), v2(4 * qdKiB)},
			hot: []int64{4*qdGiB - 3, 4*qdGiB + 2*qdMiB, 5*qdGiB - 512}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			rng := qdRand(t)
			dir := qdTempDir(t)
			paths, ops := qdBuildChain(t, dir, tc, rng)
			top := paths[len(paths)-1]
			raw := qdQemuRaw(t, top)

			img, err := disk.Open(top, disk.OpenOptions{ReadOnly: true})
			if err != nil {
				t.Fatalf("disk.Open(%s): %v", top, err)
			}
			t.Cleanup(func() { img.Close() })
			if got := len(disk.Layers(img)); got != len(tc.layers) {
				t.Fatalf("chain has %d layers, want %d", got, len(tc.layers))
			}
			qdCheckInfo(t, img, tc)
			if img.Size() != tc.size {
				t.Fatalf("Size() = %d, want %d", img.Size(), tc.size)
			}

			ranges := qdRanges(rng, tc.size, 64*qdKiB, ops, tc.sample)
			qdCompareRanges(t, "cvd vs qemu-img convert", img, raw, ranges)

			qr := qdOpenThirdReader(t, top)
			qdCompareRanges(t, "go-qcow2reader vs qemu-img convert", qr, raw, ranges)

			qdCompareChainMap(t, img, top, tc)
			for i, l := range disk.Layers(img) {
				if tc.layers[len(tc.layers)-1-i].fmt() == "qcow2" {
					qdCompareLayerMap(t, l, tc.sample)
				}
			}
			for _, p := range paths {
				if strings.HasSuffix(p, ".qcow2") {
					qdCompareCheck(t, p)
				}
			}
		})
	}
}

// qdCheckInfo compares what Info says of each layer with how QEMU made it.
func qdCheckInfo(t *testing.T, img disk.Image, tc qdChain) {
	t.Helper()
	layers := disk.Layers(img)
	for i, l := range layers {
		spec := tc.layers[len(tc.layers)-1-i]
		info := l.Info()
		if string(info.Format) != spec.fmt() {
			t.Errorf("layer %d: format %q, want %q", i, info.Format, spec.fmt())
		}
		wantSize := spec.size
		if wantSize == 0 {
			wantSize = tc.size
		}
		if info.Size != wantSize || l.Size() != wantSize {
			t.Errorf("layer %d: size %d (Size() %d), want %d", i, info.Size, l.Size(), wantSize)
		}
		if spec.fmt() != "qcow2" {
			continue
		}
		wantVersion := 3
		if spec.compat == "0.10" {
			wantVersion = 2
		}
		if info.Version != wantVersion || int64(info.ClusterSize) != spec.cs() {
			t.Errorf("layer %d: version %d cluster %d, want %d and %d", i, info.Version, info.ClusterSize, wantVersion, spec.cs())
		}
		wantRef := spec.refBits
		if wantRef == 0 {
			wantRef = 16
		}
		if info.RefcountBits != wantRef {
			t.Errorf("layer %d: refcount bits %d, want %d", i, info.RefcountBits, wantRef)
		}
		wantComp := "deflate"
		if spec.compress == "zstd" {
			wantComp = "zstd"
		}
		if info.Compression != wantComp {
			t.Errorf("layer %d: compression %q, want %q", i, info.Compression, wantComp)
		}
		if i+1 < len(layers) {
			below := layers[i+1].Info()
			if info.BackingName != filepath.Base(below.Path) || string(info.BackingFormat) != tc.layers[len(tc.layers)-2-i].fmt() {
				t.Errorf("layer %d: backing %q (%q), want %q (%q)", i, info.BackingName, info.BackingFormat, filepath.Base(below.Path), tc.layers[len(tc.layers)-2-i].fmt())
			}
		}
	}
}

// qdBuildChain makes the chain with qemu-img and qemu-io and returns the layer
// paths (bottom first) and every range the operations touched.
func qdBuildChain(t *testing.T, dir string, c qdChain, rng *rand.Rand) ([]string, [][2]int64) {
	t.Helper()
	var paths []string
	var touched [][2]int64
	for i, l := range c.layers {
		size := l.size
		if size == 0 {
			size = c.size
		}
		path := filepath.Join(dir, fmt.Sprintf("l%d.%s", i, l.fmt()))
		nops := l.ops
		if nops == 0 {
			nops = 40
		}
		ops := qdGenQemuOps(rng, size, l.cs(), nops, c.hot, l.fmt() == "qcow2" && l.compat != "0.10")
		for _, o := range ops {
			touched = append(touched, [2]int64{o.off, o.n})
		}
		switch {
		case l.fmt() == "raw":
			testutil.Run(t, "qemu-img", "create", "-q", "-f", "raw", path, strconv.FormatInt(size, 10))
			qdQemuIO(t, "raw", path, qdQemuCmds(ops))
		case l.compress != "":
			// Compressed clusters come from qemu-img convert -c of a
			// standalone image; a few writes after it mix in normal
			// clusters and partial rewrites of compressed ones.
			src := path + ".src.qcow2"
			testutil.Run(t, "qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size="+strconv.FormatInt(l.cs(), 10), src, strconv.FormatInt(size, 10))
			qdQemuIO(t, "qcow2", src, qdQemuCmds(ops))
			o := fmt.Sprintf("cluster_size=%d,compat=%s", l.cs(), qdOr(l.compat, "1.1"))
			if l.compat != "0.10" {
				o += ",compression_type=" + l.compress
			}
			testutil.Run(t, "qemu-img", "convert", "-c", "-O", "qcow2", "-o", o, src, path)
			os.Remove(src)
			if i > 0 {
				testutil.Run(t, "qemu-img", "rebase", "-u", "-b", filepath.Base(paths[i-1]), "-F", c.layers[i-1].fmt(), path)
			}
			more := qdGenQemuOps(rng, size, l.cs(), 6, c.hot, l.compat != "0.10")
			for _, o := range more {
				touched = append(touched, [2]int64{o.off, o.n})
			}
			qdQemuIO(t, "qcow2", path, qdQemuCmds(more))
		default:
			o := fmt.Sprintf("cluster_size=%d,compat=%s", l.cs(), qdOr(l.compat, "1.1"))
			if l.refBits != 0 {
				o += fmt.Sprintf(",refcount_bits=%d", l.refBits)
			}
			args := []string{"create", "-q", "-f", "qcow2", "-o", o}
			if i > 0 {
				args = append(args, "-b", filepath.Base(paths[i-1]), "-F", c.layers[i-1].fmt())
			}
			testutil.Run(t, "qemu-img", append(args, path, strconv.FormatInt(size, 10))...)
			qdQemuIO(t, "qcow2", path, qdQemuCmds(ops))
		}
		paths = append(paths, path)
	}
	return paths, touched
}

func qdOr(s, def string) string {
	if s == "" {
		return def
	}
	return s
}

// qdOp is one operation: 'w' write (pat: the byte, or random data when
// random), 'z' write zeroes, 'd' discard.
type qdOp struct {
	kind   byte
	off, n int64
	pat    byte
	random bool
}

// qdGenQemuOps draws operations for qemu-io: writes with a pattern, zero
// writes, and discards (whole clusters when exact is set, so that the result
// is known: v3 discards read back as zeros).
func qdGenQemuOps(rng *rand.Rand, size, cs int64, n int, hot []int64, exact bool) []qdOp {
	var ops []qdOp
	for range n {
		off, ln := qdGenRange(rng, size, cs, hot)
		r := rng.IntN(100)
		switch {
		case r < 70:
			ops = append(ops, qdOp{kind: 'w', off: off, n: ln, pat: byte(rng.IntN(255) + 1)})
		case r < 85:
			ops = append(ops, qdOp{kind: 'z', off: off, n: ln})
		default:
			if exact {
				off = off / cs * cs
				ln = (ln + cs - 1) / cs * cs
				if off+ln > size {
					ln = (size - off) / cs * cs
				}
				if ln == 0 {
					continue
				}
			}
			ops = append(ops, qdOp{kind: 'd', off: off, n: ln})
		}
	}
	return ops
}

// qdHotOnly in the hot list makes qdGenRange aim at hot offsets only (large
// sparse disks, where random clusters would each cost a whole cluster).
const qdHotOnly = -1

// qdGenRange draws an unaligned range near a cluster boundary or a hot offset
// (half of the time, or always when hot starts with qdHotOnly): mostly small,
// sometimes a few clusters long (at most 1 MiB).
func qdGenRange(rng *rand.Rand, size, cs int64, hot []int64) (int64, int64) {
	only := len(hot) > 0 && hot[0] == qdHotOnly
	if only {
		hot = hot[1:]
	}
	var center int64
	if len(hot) > 0 && (only || rng.IntN(2) == 0) {
		center = hot[rng.IntN(len(hot))]
	} else {
		center = rng.Int64N(size/cs+1) * cs
	}
	off := center + rng.Int64N(4*cs) - 2*cs
	off = min(max(off, 0), size-1)
	var maxLen int64
	switch r := rng.IntN(10); {
	case r < 5:
		maxLen = 4 * qdKiB
	case r < 8:
		maxLen = min(cs+cs/2, 256*qdKiB)
	default:
		maxLen = min(3*cs, qdMiB)
	}
	ln := 1 + rng.Int64N(maxLen)
	ln = min(ln, size-off)
	return off, ln
}

func qdQemuCmds(ops []qdOp) []string {
	var cmds []string
	for _, o := range ops {
		switch o.kind {
		case 'w':
			cmds = append(cmds, fmt.Sprintf("write -P %#x %d %d", o.pat, o.off, o.n))
		case 'z':
			cmds = append(cmds, fmt.Sprintf("write -z %d %d", o.off, o.n))
		case 'd':
			cmds = append(cmds, fmt.Sprintf("discard %d %d", o.off, o.n))
		}
	}
	return cmds
}

// qdQemuIO runs qemu-io commands on one image, many per process.
func qdQemuIO(t testing.TB, format, path string, cmds []string) {
	t.Helper()
	for len(cmds) > 0 {
		n := min(len(cmds), 200)
		args := []string{"-f", format}
		for _, c := range cmds[:n] {
			args = append(args, "-c", c)
		}
		testutil.Run(t, "qemu-io", append(args, path)...)
		cmds = cmds[n:]
	}
}

// qdQemuRaw converts the chain at path to a raw file with qemu-img and opens it.
func qdQemuRaw(t testing.TB, path string) *os.File {
	t.Helper()
	out := path + ".qemu.raw"
	testutil.Run(t, "qemu-img", "convert", "-O", "raw", path, out)
	f, err := os.Open(out)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close(); os.Remove(out) })
	return f
}

// qdRanges lists the ranges to compare: the whole disk in 1 MiB pieces (or,
// when sample is set, every touched range widened by a cluster on each side),
// and random ranges.
func qdRanges(rng *rand.Rand, size, cs int64, touched [][2]int64, sample bool) [][2]int64 {
	var r [][2]int64
	if !sample {
		for off := int64(0); off < size; off += qdMiB {
			r = append(r, [2]int64{off, min(qdMiB, size-off)})
		}
	} else {
		for _, tr := range touched {
			s := max(tr[0]-cs, 0)
			e := min(tr[0]+tr[1]+cs, size)
			for off := s; off < e; off += 4 * qdMiB {
				r = append(r, [2]int64{off, min(4*qdMiB, e-off)})
			}
		}
	}
	for range 300 {
		off := rng.Int64N(size)
		n := 1 + rng.Int64N(min(3*cs, size-off))
		if rng.IntN(3) == 0 {
			n = 1 + rng.Int64N(min(600, size-off))
		}
		r = append(r, [2]int64{off, n})
	}
	return r
}

// qdReadFull reads len(p) bytes at off; io.EOF together with a full read is fine.
func qdReadFull(r io.ReaderAt, p []byte, off int64) error {
	n, err := r.ReadAt(p, off)
	if n == len(p) && (err == nil || errors.Is(err, io.EOF)) {
		return nil
	}
	if err == nil {
		err = io.ErrUnexpectedEOF
	}
	return fmt.Errorf("read %d bytes at %d: got %d: %w", len(p), off, n, err)
}

// qdCompareRanges reads each range from got and want and fails at the first
// difference, naming its offset.
func qdCompareRanges(t testing.TB, what string, got, want io.ReaderAt, ranges [][2]int64) {
	t.Helper()
	var a, b []byte
	for _, r := range ranges {
		if r[1] <= 0 {
			continue
		}
		if int64(cap(a)) < r[1] {
			a, b = make([]byte, r[1]), make([]byte, r[1])
		}
		a, b = a[:r[1]], b[:r[1]]
		if err := qdReadFull(want, b, r[0]); err != nil {
			t.Fatalf("%s: reference: %v", what, err)
		}
		if err := qdReadFull(got, a, r[0]); err != nil {
			t.Fatalf("%s: %v", what, err)
		}
		if !bytes.Equal(a, b) {
			i := qdFirstDiff(a, b)
			t.Fatalf("%s: range [%d, +%d) differs at offset %d (%#x): got %#02x, want %#02x (%d bytes differ)",
				what, r[0], r[1], r[0]+int64(i), r[0]+int64(i), a[i], b[i], qdCountDiff(a, b))
		}
	}
}

func qdFirstDiff(a, b []byte) int {
	for i := range a {
		if a[i] != b[i] {
			return i
		}
	}
	return -1
}

func qdCountDiff(a, b []byte) int {
	n := 0
	for i := range a {
		if a[i] != b[i] {
			n++
		}
	}
	return n
}

// ---------------------------------------------------------------------------
// go-qcow2reader, the third reader

var qdQROnce sync.Once

// qdInitThirdReader registers decompressors with go-qcow2reader: zstd (it has
// none), and deflate again, both behind qdNoEarlyEOF: v0.7.1 reads a cluster
// with one Read call and fails when the stream's last bytes come with io.EOF,
// as compress/flate returns them.
func qdInitThirdReader() {
	qdQROnce.Do(func() {
		qrqcow2.SetDecompressor(qrqcow2.CompressionTypeZstd, func(r io.Reader) (io.ReadCloser, error) {
			d, err := zstd.NewReader(r)
			if err != nil {
				return nil, err
			}
			return qdNoEarlyEOF{d.IOReadCloser()}, nil
		})
		qrqcow2.SetDecompressor(qrqcow2.CompressionTypeZlib, func(r io.Reader) (io.ReadCloser, error) {
			return qdNoEarlyEOF{flate.NewReader(r)}, nil
		})
	})
}

// qdNoEarlyEOF holds io.EOF back until a Read returns no data, and fills p
// as far as the stream goes.
type qdNoEarlyEOF struct{ io.ReadCloser }

func (r qdNoEarlyEOF) Read(p []byte) (int, error) {
	n, err := io.ReadFull(r.ReadCloser, p)
	if n > 0 && (errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF)) {
		return n, nil
	}
	return n, err
}

// qdSafeReader turns a panic of go-qcow2reader into an error.
type qdSafeReader struct{ img qrimage.Image }

func (s qdSafeReader) ReadAt(p []byte, off int64) (n int, err error) {
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("go-qcow2reader panicked: %v", r)
		}
	}()
	return s.img.ReadAt(p, off)
}

// qdOpenThirdReader opens path and its chain with go-qcow2reader, which panics
// on some broken backing files: that is caught and reported.
func qdOpenThirdReader(t testing.TB, path string) io.ReaderAt {
	t.Helper()
	qdInitThirdReader()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	var img qrimage.Image
	func() {
		defer func() {
			if r := recover(); r != nil {
				err = fmt.Errorf("go-qcow2reader panicked: %v", r)
			}
		}()
		img, err = qcow2reader.Open(f)
	}()
	if err == nil && img != nil {
		err = img.Readable()
	}
	if err != nil {
		f.Close()
		t.Fatalf("go-qcow2reader: open %s: %v", path, err)
	}
	t.Cleanup(func() {
		defer func() { recover() }()
		img.Close()
	})
	return qdSafeReader{img}
}

// ---------------------------------------------------------------------------
// maps

// qdQemuExtent is one entry of `qemu-img map --output=json`.
type qdQemuExtent struct {
	Start   int64  `json:"start"`
	Length  int64  `json:"length"`
	Depth   int    `json:"depth"`
	Present bool   `json:"present"`
	Zero    bool   `json:"zero"`
	Data    bool   `json:"data"`
	Offset  *int64 `json:"offset"`
}

func qdQemuMap(t testing.TB, spec string) []qdQemuExtent {
	t.Helper()
	out := testutil.Run(t, "qemu-img", "map", "--output=json", spec)
	var m []qdQemuExtent
	if err := json.Unmarshal([]byte(out), &m); err != nil {
		t.Fatalf("qemu-img map %s: %v\n%s", spec, err, out)
	}
	return m
}

// qdLayerSpec names one qcow2 layer alone for qemu-img (its backing file cut off).
func qdLayerSpec(path string) string {
	b, _ := json.Marshal(map[string]any{
		"driver":  "qcow2",
		"backing": nil,
		"file":    map[string]any{"driver": "file", "filename": path},
	})
	return "json:" + string(b)
}

// qdBounds returns the sorted union of extent boundaries within [0, size).
func qdBounds(size int64, lists ...[][2]int64) []int64 {
	set := map[int64]bool{0: true, size: true}
	for _, l := range lists {
		for _, e := range l {
			if e[0] > 0 && e[0] < size {
				set[e[0]] = true
			}
			if end := e[0] + e[1]; end > 0 && end < size {
				set[end] = true
			}
		}
	}
	var b []int64
	for k := range set {
		b = append(b, k)
	}
	slices.Sort(b)
	return b
}

// qdFind returns the index of the extent (sorted, non-overlapping) holding off, or -1.
func qdFind(spans [][2]int64, off int64) int {
	i := sort.Search(len(spans), func(i int) bool { return spans[i][0]+spans[i][1] > off })
	if i < len(spans) && spans[i][0] <= off {
		return i
	}
	return -1
}

// qdCheckSorted fails when extents overlap, are out of order or empty.
func qdCheckSorted(t testing.TB, what string, spans [][2]int64) {
	t.Helper()
	for i, s := range spans {
		if s[1] <= 0 {
			t.Fatalf("%s: extent %d [%d, +%d) is empty", what, i, s[0], s[1])
		}
		if i > 0 && spans[i-1][0]+spans[i-1][1] > s[0] {
			t.Fatalf("%s: extent %d [%d, +%d) overlaps or precedes the one before", what, i, s[0], s[1])
		}
	}
}

// qdCompareChainMap compares MapChain with qemu-img map of the chain:
// depth where a layer allocates the range, zero, data.
func qdCompareChainMap(t *testing.T, img disk.Image, top string, tc qdChain) {
	t.Helper()
	size := img.Size()
	ce, err := disk.MapChain(img, 0, size)
	if err != nil {
		t.Fatalf("MapChain: %v", err)
	}
	qm := qdQemuMap(t, top)
	cs := make([][2]int64, len(ce))
	for i, e := range ce {
		cs[i] = [2]int64{e.Off, e.Len}
	}
	qs := make([][2]int64, len(qm))
	for i, e := range qm {
		qs[i] = [2]int64{e.Start, e.Length}
	}
	qdCheckSorted(t, "MapChain", cs)
	layers := disk.Layers(img)
	bounds := qdBounds(size, cs, qs)
	bad := 0
	for i := 0; i+1 < len(bounds); i++ {
		off, n := bounds[i], bounds[i+1]-bounds[i]
		c := disk.ChainExtent{Off: off, Len: n, Depth: -1, Zero: true} // a gap reads as zeros
		if j := qdFind(cs, off); j >= 0 {
			c = ce[j]
		}
		j := qdFind(qs, off)
		if j < 0 {
			t.Fatalf("qemu-img map does not cover offset %d", off)
		}
		q := qm[j]
		if msg := qdChainMismatch(t, layers, c, q, off, n); msg != "" {
			bad++
			if bad <= 10 {
				t.Errorf("map [%d, +%d): %s (cvd depth %d zero %v; qemu depth %d present %v zero %v data %v)",
					off, n, msg, c.Depth, c.Zero, q.Depth, q.Present, q.Zero, q.Data)
			}
		}
	}
	if bad > 0 {
		t.Errorf("MapChain disagrees with qemu-img map on %d ranges", bad)
	}
}

func qdChainMismatch(t *testing.T, layers []disk.Image, c disk.ChainExtent, q qdQemuExtent, off, n int64) string {
	isRaw := func(d int) bool { return d >= 0 && d < len(layers) && layers[d].Info().Format == disk.FormatRaw }
	switch {
	case !q.Present:
		if c.Depth != -1 || !c.Zero {
			return "qemu: no layer allocates it"
		}
	case c.Depth != q.Depth:
		return "serving layers differ"
	case c.Zero != q.Zero:
		// QEMU also calls zero what a data cluster holds over a hole of the
		// host file (or past its end), and the holes of a raw layer: allowed
		// when the bytes really are zeros.
		if !c.Zero && q.Zero && (isRaw(q.Depth) || q.Offset != nil) && qdReadsZero(t, layers[0], off, n) {
			return ""
		}
		return "zero flags differ"
	case q.Data != (c.Depth >= 0 && !c.Zero):
		return "data flags differ"
	}
	return ""
}

func qdReadsZero(t testing.TB, img disk.Image, off, n int64) bool {
	t.Helper()
	buf := make([]byte, min(n, 4*qdMiB))
	for done := int64(0); done < n; {
		p := buf[:min(int64(len(buf)), n-done)]
		if err := qdReadFull(img, p, off+done); err != nil {
			t.Fatal(err)
		}
		for _, b := range p {
			if b != 0 {
				return false
			}
		}
		done += int64(len(p))
	}
	return true
}

// qdCompareLayerMap compares MapLayer of one qcow2 layer with qemu-img map of
// that layer with its backing file cut off: state, and the host offset of
// uncompressed data.
func qdCompareLayerMap(t *testing.T, l disk.Image, sample bool) {
	t.Helper()
	info := l.Info()
	size := l.Size()
	le, err := l.MapLayer(0, size)
	if err != nil {
		t.Fatalf("MapLayer %s: %v", info.Path, err)
	}
	qm := qdQemuMap(t, qdLayerSpec(info.Path))
	ls := make([][2]int64, len(le))
	for i, e := range le {
		ls[i] = [2]int64{e.Off, e.Len}
	}
	qs := make([][2]int64, len(qm))
	for i, e := range qm {
		qs[i] = [2]int64{e.Start, e.Length}
	}
	qdCheckSorted(t, "MapLayer "+filepath.Base(info.Path), ls)
	var alone disk.Image // the layer opened alone, to read what it holds
	bounds := qdBounds(size, ls, qs)
	bad := 0
	for i := 0; i+1 < len(bounds); i++ {
		off, n := bounds[i], bounds[i+1]-bounds[i]
		e := disk.Extent{Off: off, Len: n, State: disk.Unallocated, HostOff: -1}
		if j := qdFind(ls, off); j >= 0 {
			e = le[j]
		}
		j := qdFind(qs, off)
		if j < 0 {
			t.Fatalf("qemu-img map of %s does not cover offset %d", info.Path, off)
		}
		q := qm[j]
		var msg string
		switch e.State {
		case disk.Unallocated:
			if q.Present {
				msg = "cvd: unallocated"
			}
		case disk.Zero:
			if !q.Present || !q.Zero || q.Data {
				msg = "cvd: zero"
			}
		case disk.Data:
			switch {
			case !q.Present:
				msg = "cvd: data, qemu: unallocated"
			case !q.Data && q.Zero && q.Offset != nil && !e.Compressed:
				// a data cluster over a hole of the host file
				if alone == nil {
					alone, err = disk.Open(info.Path, disk.OpenOptions{ReadOnly: true, NoBacking: true})
					if err != nil {
						t.Fatal(err)
					}
					defer alone.Close()
				}
				if !qdReadsZero(t, alone, off, n) {
					msg = "qemu: zero over a host hole, but cvd reads data"
				}
			case !q.Data:
				msg = "cvd: data, qemu: not data"
			case e.Compressed && q.Offset != nil:
				msg = "cvd: compressed, qemu: has a host offset"
			case !e.Compressed && e.HostOff >= 0:
				want := e.HostOff + (off - e.Off)
				if q.Offset == nil || *q.Offset+(off-q.Start) != want {
					msg = fmt.Sprintf("host offsets differ (cvd %#x)", want)
				}
			case !e.Compressed:
				msg = "cvd: uncompressed data without a host offset"
			}
		}
		if msg != "" {
			bad++
			if bad <= 10 {
				qo := "none"
				if q.Offset != nil {
					qo = fmt.Sprintf("%#x", *q.Offset+(off-q.Start))
				}
				t.Errorf("layer map %s [%d, +%d): %s (cvd %v compressed %v; qemu present %v zero %v data %v offset %s)",
					filepath.Base(info.Path), off, n, msg, e.State, e.Compressed, q.Present, q.Zero, q.Data, qo)
			}
		}
	}
	if bad > 0 {
		t.Errorf("MapLayer %s disagrees with qemu-img map on %d ranges", filepath.Base(info.Path), bad)
	}
}

// ---------------------------------------------------------------------------
// check

// qdQemuCheckResult is `qemu-img check --output=json` (absent keys are zero).
type qdQemuCheckResult struct {
	CheckErrors        int   `json:"check-errors"`
	Corruptions        int   `json:"corruptions"`
	Leaks              int   `json:"leaks"`
	TotalClusters      int64 `json:"total-clusters"`
	AllocatedClusters  int64 `json:"allocated-clusters"`
	FragmentedClusters int64 `json:"fragmented-clusters"`
	CompressedClusters int64 `json:"compressed-clusters"`
	ImageEndOffset     int64 `json:"image-end-offset"`
}

func qdQemuCheck(t testing.TB, path string) qdQemuCheckResult {
	t.Helper()
	out, _ := testutil.RunErr("qemu-img", "check", "--output=json", path)
	var r qdQemuCheckResult
	if i := strings.Index(out, "{"); i < 0 || json.Unmarshal([]byte(out[i:]), &r) != nil {
		t.Fatalf("qemu-img check %s: no JSON\n%s", path, out)
	}
	return r
}

// qdCompareCheck runs disk.Check and qemu-img check on one layer and compares
// their counts of corruptions, leaks and check errors.
func qdCompareCheck(t testing.TB, path string) (*disk.CheckResult, qdQemuCheckResult) {
	t.Helper()
	q := qdQemuCheck(t, path)
	r, err := disk.Check(path, false)
	if err != nil {
		t.Fatalf("disk.Check(%s): %v", path, err)
	}
	if r.Corruptions != q.Corruptions || r.Leaks != q.Leaks || r.CheckErrors != q.CheckErrors {
		t.Errorf("check %s: cvd found %d corruptions, %d leaks, %d check errors; qemu-img %d, %d, %d\ncvd messages: %q",
			filepath.Base(path), r.Corruptions, r.Leaks, r.CheckErrors, q.Corruptions, q.Leaks, q.CheckErrors, r.Messages)
	}
	return r, q
}

// qdCompareCheckStats compares the statistics of disk.Check and qemu-img
// check: total, allocated, fragmented and compressed clusters, image end.
func qdCompareCheckStats(t testing.TB, path string) {
	t.Helper()
	r, q := qdCompareCheck(t, path)
	if r.TotalClusters != q.TotalClusters || r.AllocatedClusters != q.AllocatedClusters ||
		r.CompressedClusters != q.CompressedClusters || r.ImageEndOffset != q.ImageEndOffset ||
		r.FragmentedClusters != q.FragmentedClusters {
		t.Errorf("check %s statistics: cvd total %d allocated %d fragmented %d compressed %d end %d; qemu-img %d %d %d %d %d",
			filepath.Base(path), r.TotalClusters, r.AllocatedClusters, r.FragmentedClusters, r.CompressedClusters, r.ImageEndOffset,
			q.TotalClusters, q.AllocatedClusters, q.FragmentedClusters, q.CompressedClusters, q.ImageEndOffset)
	}
}

// TestDiskBugCheckStatisticsDifferFromQemu: disk.Check's allocated-clusters
// and fragmented-clusters differ from qemu-img check's. QEMU
// (check_refcounts_l2) counts a zero cluster that keeps its host cluster
// (ZERO_ALLOC) as allocated, counts every compressed cluster as fragmented,
// and restarts "contiguous" at each L2 table. See .cache/disk-bugs.md.
func TestDiskBugCheckStatisticsDifferFromQemu(t *testing.T) {
	testutil.NeedQemu(t)
	dir := qdTempDir(t)
	tests := []struct {
		name string
		make func(path string)
	}{
		{name: "zero cluster keeping its allocation", make: func(p string) {
			testutil.Run(t, "qemu-img", "create", "-q", "-f", "qcow2", p, "1M")
			qdQemuIO(t, "qcow2", p, []string{"write -P 1 0 128K", "write -z 0 64K"})
		}},
		{name: "compressed clusters", make: func(p string) {
			src := p + ".src"
			testutil.Run(t, "qemu-img", "create", "-q", "-f", "qcow2", src, "1M")
			qdQemuIO(t, "qcow2", src, []string{"write -P 1 0 256K"})
			testutil.Run(t, "qemu-img", "convert", "-c", "-O", "qcow2", src, p)
		}},
		{name: "contiguous across an L2 table boundary", make: func(p string) {
			// 512-byte clusters: an L2 table maps 64 clusters (32 KiB).
			testutil.Run(t, "qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=512", p, "1M")
			qdQemuIO(t, "qcow2", p, []string{"write -P 1 0 64K"})
		}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			p := filepath.Join(dir, strings.ReplaceAll(tc.name, " ", "-")+".qcow2")
			tc.make(p)
			qdCompareCheckStats(t, p)
		})
	}
}

// TestDiskBugCheckMissesCopiedFlagOnFreeCluster: an L2 entry with the COPIED
// flag that points past the end of the file is two corruptions for qemu-img
// check (the reference past the end, and COPIED set on a cluster whose
// refcount is 0, not 1); disk.Check counts one. See .cache/disk-bugs.md.
func TestDiskBugCheckMissesCopiedFlagOnFreeCluster(t *testing.T) {
	testutil.NeedQemu(t)
	dir := qdTempDir(t)
	p := filepath.Join(dir, "a.qcow2")
	testutil.Run(t, "qemu-img", "create", "-q", "-f", "qcow2", p, "1M")
	qdQemuIO(t, "qcow2", p, []string{"write -P 1 0 128K"})
	q := qdParse(t, p)
	q.setL2(1, 1<<63|uint64(len(q.b))+64<<20)
	q.save(t, p)
	qdCompareCheck(t, p)
}

// TestDiskBugCheckCountsUnalignedL2Entry: an L2 entry whose host offset is
// not cluster-aligned (0x50000 → 0x50200). qemu-img check counts the
// reference over the host range it covers, [0x50200, +cluster), so the next
// host cluster is referenced twice: 2 corruptions, 0 leaks. disk.Check counts
// 1 corruption and 1 leak. See .cache/disk-bugs.md.
func TestDiskBugCheckCountsUnalignedL2Entry(t *testing.T) {
	testutil.NeedQemu(t)
	dir := qdTempDir(t)
	p := filepath.Join(dir, "a.qcow2")
	testutil.Run(t, "qemu-img", "create", "-q", "-f", "qcow2", p, "1M")
	qdQemuIO(t, "qcow2", p, []string{"write -P 1 0 192K"})
	q := qdParse(t, p)
	q.setL2(0, q.getL2(0)+512)
	q.save(t, p)
	qdCompareCheck(t, p)
}

// qdQcow2 is a hand-rolled view of a small qcow2 file, independent of the
// engine, to corrupt images on purpose.
type qdQcow2 struct {
	b           []byte
	clusterBits uint
	l1Off       int64
	refTableOff int64
	refOrder    uint
}

func qdParse(t testing.TB, path string) *qdQcow2 {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	be := binary.BigEndian
	q := &qdQcow2{b: b, clusterBits: uint(be.Uint32(b[20:])), l1Off: int64(be.Uint64(b[40:])), refTableOff: int64(be.Uint64(b[48:])), refOrder: 4}
	if be.Uint32(b[4:]) >= 3 {
		q.refOrder = uint(be.Uint32(b[96:]))
	}
	return q
}

const qdOffMask = 0x00fffffffffffe00

func (q *qdQcow2) l2Entry(idx int64) int64 {
	l2 := int64(binary.BigEndian.Uint64(q.b[q.l1Off:]) & qdOffMask)
	return l2 + idx*8
}

func (q *qdQcow2) getL2(idx int64) uint64 { return binary.BigEndian.Uint64(q.b[q.l2Entry(idx):]) }
func (q *qdQcow2) setL2(idx int64, v uint64) {
	binary.BigEndian.PutUint64(q.b[q.l2Entry(idx):], v)
}

// setRefcount sets the 16-bit refcount of host cluster k (first refcount block only).
func (q *qdQcow2) setRefcount(t testing.TB, k int64, v uint16) {
	t.Helper()
	if q.refOrder != 4 {
		t.Fatal("setRefcount handles 16-bit refcounts only")
	}
	rb := int64(binary.BigEndian.Uint64(q.b[q.refTableOff:]) & qdOffMask)
	binary.BigEndian.PutUint16(q.b[rb+2*k:], v)
}

func (q *qdQcow2) save(t testing.TB, path string) {
	t.Helper()
	if err := os.WriteFile(path, q.b, 0o644); err != nil {
		t.Fatal(err)
	}
}

// TestQemuDiffCheckCorrupted: on images corrupted on purpose, disk.Check counts
// the same corruptions and leaks as qemu-img check, and repairing leaks leaves
// an image qemu-img finds clean.
func TestQemuDiffCheckCorrupted(t *testing.T) {
	testutil.NeedQemu(t)
	dir := qdTempDir(t)
	src := filepath.Join(dir, "src.qcow2")
	testutil.Run(t, "qemu-img", "create", "-q", "-f", "qcow2", src, "4M")
	// Data in guest clusters 0, 1, 2, 5 (64 KiB each); host clusters are
	// header 0, L1 3... whatever QEMU chose: the cases read them back.
	qdQemuIO(t, "qcow2", src, []string{"write -P 1 0 192K", "write -P 2 320K 64K"})

	tests := []struct {
		name    string
		corrupt func(t *testing.T, q *qdQcow2)
		leaksOK bool // only leaks: repair must make it clean
		same    bool // the guest data is unchanged
	}{
		{name: "clean", corrupt: func(t *testing.T, q *qdQcow2) {}, leaksOK: true, same: true},
		{name: "one leak", leaksOK: true, corrupt: func(t *testing.T, q *qdQcow2) { q.setL2(1, 0) }},
		{name: "two leaks", leaksOK: true, corrupt: func(t *testing.T, q *qdQcow2) { q.setL2(0, 0); q.setL2(5, 0) }},
		{name: "refcount raised on free cluster", leaksOK: true, same: true, corrupt: func(t *testing.T, q *qdQcow2) {
			end := int64(len(q.b)) >> q.clusterBits
			q.b = append(q.b, make([]byte, 1<<q.clusterBits)...)
			q.setRefcount(t, end, 1)
		}},
		{name: "refcount 2 on a COPIED data cluster", corrupt: func(t *testing.T, q *qdQcow2) {
			q.setRefcount(t, int64(q.getL2(0)&qdOffMask)>>q.clusterBits, 2)
		}},
		{name: "refcount 0 on a data cluster", corrupt: func(t *testing.T, q *qdQcow2) {
			q.setRefcount(t, int64(q.getL2(2)&qdOffMask)>>q.clusterBits, 0)
		}},
		{name: "L2 entry past end of file", corrupt: func(t *testing.T, q *qdQcow2) {
			q.setL2(1, uint64(len(q.b))+64<<20) // without COPIED: see TestDiskBugCheckMissesCopiedFlagOnFreeCluster
		}},
		{name: "refcount 0 on a refcount block", corrupt: func(t *testing.T, q *qdQcow2) {
			rb := int64(binary.BigEndian.Uint64(q.b[q.refTableOff:]) & qdOffMask)
			q.setRefcount(t, rb>>q.clusterBits, 0)
		}},
		{name: "two L2 entries share a cluster", corrupt: func(t *testing.T, q *qdQcow2) {
			q.setL2(5, q.getL2(0))
		}},
		{name: "refcount 0 on the L2 table", corrupt: func(t *testing.T, q *qdQcow2) {
			q.setRefcount(t, (q.l2Entry(0))>>q.clusterBits, 0)
		}},
		{name: "COPIED flag missing", corrupt: func(t *testing.T, q *qdQcow2) {
			q.setL2(0, q.getL2(0)&^(1<<63))
		}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(dir, strings.ReplaceAll(tc.name, " ", "-")+".qcow2")
			q := qdParse(t, src)
			tc.corrupt(t, q)
			q.save(t, path)
			r, qr := qdCompareCheck(t, path)
			t.Logf("qemu-img check: %+v; cvd: %d corruptions %d leaks", qr, r.Corruptions, r.Leaks)
			if !tc.leaksOK {
				if qr.Corruptions == 0 {
					t.Fatalf("the corruption was not seen by qemu-img: the test is wrong")
				}
				return
			}
			if qr.Corruptions != 0 {
				t.Fatalf("qemu-img finds corruption in a leaks-only case: the test is wrong")
			}
			rr, err := disk.Check(path, true)
			if err != nil {
				t.Fatalf("disk.Check repair: %v", err)
			}
			if rr.LeaksFixed != qr.Leaks {
				t.Errorf("repair fixed %d leaks, qemu-img counted %d", rr.LeaksFixed, qr.Leaks)
			}
			testutil.QemuCheck(t, path)
			if after, _ := qdCompareCheck(t, path); after.Leaks != 0 || after.Corruptions != 0 {
				t.Errorf("after repair cvd still finds %+v", after)
			}
			if tc.same && !testutil.QemuCompare(t, path, src) {
				t.Errorf("repair changed the guest data")
			}
		})
	}
}

// ---------------------------------------------------------------------------
// cvd → QEMU

// qdWriteCase is an image cvd creates (over a chain QEMU made, or alone) and
// writes at random.
type qdWriteCase struct {
	name    string
	size    int64
	cluster int
	backing []qdLayer // bottom first; empty: no backing file
	ops     int
	fill    int64 // bytes written sequentially first, to grow the metadata
	growRT  bool  // the refcount table must have grown past one cluster
	direct  bool  // write with OpenOptions.DirectData
}

func TestQemuDiffCvdWrites(t *testing.T) {
	testutil.NeedQemu(t)
	tests := []qdWriteCase{
		{name: "512B alone grows refcount table", size: 24 * qdMiB, cluster: 512, ops: 1500, fill: 12 * qdMiB, growRT: true},
		{name: "4K alone", size: 16 * qdMiB, cluster: 4096, ops: 1500},
		{name: "64K alone", size: 32 * qdMiB, cluster: 64 << 10, ops: 800, fill: 8 * qdMiB},
		{name: "2M alone", size: 64 * qdMiB, cluster: 2 << 20, ops: 400},
		{name: "512B over qemu v3", size: 4 * qdMiB, cluster: 512, ops: 1500, backing: []qdLayer{{cluster: 4 * qdKiB}}},
		{name: "4K over qemu chain", size: 8 * qdMiB, cluster: 4096, ops: 1000, backing: []qdLayer{{cluster: 64 * qdKiB}, {compat: "0.10", cluster: 512, ops: 100}}},
		{name: "64K over qemu v2", size: 16 * qdMiB, cluster: 64 << 10, ops: 800, backing: []qdLayer{{compat: "0.10", cluster: 64 * qdKiB}}},
		{name: "64K over zstd compressed", size: 16 * qdMiB, cluster: 64 << 10, ops: 800, backing: []qdLayer{{compress: "zstd"}}},
		{name: "64K over zlib compressed 4K", size: 8 * qdMiB, cluster: 64 << 10, ops: 800, backing: []qdLayer{{compress: "zlib", cluster: 4 * qdKiB}}},
		{name: "2M over qemu 64K", size: 64 * qdMiB, cluster: 2 << 20, ops: 400, backing: []qdLayer{{cluster: 64 * qdKiB}}},
		{name: "64K over shorter raw", size: 16 * qdMiB, cluster: 64 << 10, ops: 800, backing: []qdLayer{{format: "raw", size: 5*qdMiB + 512}}},
		{name: "4K over shorter qcow2", size: 8 * qdMiB, cluster: 4096, ops: 800, backing: []qdLayer{{size: 3*qdMiB + 4096, cluster: 2 * qdMiB}}},
		{name: "64K alone, direct data", size: 32 * qdMiB, cluster: 64 << 10, ops: 800, fill: 8 * qdMiB, direct: true},
		{name: "4K over qemu chain, direct data", size: 8 * qdMiB, cluster: 4096, ops: 1000, direct: true,
			backing: []qdLayer{{cluster: 64 * qdKiB}, {compat: "0.10", cluster: 512, ops: 100}}},
		{name: "512B alone, direct data (never aligned)", size: 4 * qdMiB, cluster: 512, ops: 800, direct: true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			qdRunWriteCase(t, tc)
		})
	}
}

func qdRunWriteCase(t *testing.T, tc qdWriteCase) {
	rng := qdRand(t)
	dir := qdTempDir(t)
	model := make([]byte, tc.size)
	co := disk.CreateOptions{Size: tc.size, ClusterSize: tc.cluster}
	var touched [][2]int64
	if len(tc.backing) > 0 {
		paths, _ := qdBuildChain(t, dir, qdChain{size: tc.size, layers: tc.backing}, rng)
		below := paths[len(paths)-1]
		raw := qdQemuRaw(t, below)
		st, _ := raw.Stat()
		if err := qdReadFull(raw, model[:min(st.Size(), tc.size)], 0); err != nil {
			t.Fatal(err)
		}
		co.BackingFile = below
		co.BackingFormat = disk.Format(tc.backing[len(tc.backing)-1].fmt())
	}
	top := filepath.Join(dir, "top.qcow2")
	testutil.CheckOnCleanup(t, top)
	img, err := disk.Create(top, co)
	if err != nil {
		t.Fatalf("disk.Create: %v", err)
	}
	open := disk.OpenOptions{DirectData: tc.direct}
	if tc.direct {
		img.Close()
		if img, err = disk.Open(top, open); err != nil {
			t.Fatal(err)
		}
		if !disk.DirectActive(img) {
			t.Fatalf("O_DIRECT refused in %s: the test cannot run here", dir)
		}
	}

	cs := int64(tc.cluster)
	// Phase 1: sequential fill, then random operations.
	for off := int64(0); off < tc.fill; off += 64 * qdKiB {
		touched = append(touched, qdApply(t, img, model, rng, qdOp{kind: 'w', off: off, n: min(64*qdKiB, tc.fill-off), random: true}))
	}
	ops := qdGenCvdOps(rng, tc.size, cs, tc.ops, nil, nil)
	for _, o := range ops {
		touched = append(touched, qdApply(t, img, model, rng, o))
	}
	if tc.direct && !disk.DirectActive(img) {
		t.Error("a direct write failed and the image fell back to the page cache")
	}
	if n := disk.DirectWrites(img); tc.direct && (n == 0) != (tc.cluster < 4096) {
		t.Errorf("%d data writes went through O_DIRECT with %d-byte clusters", n, tc.cluster)
	}
	if err := img.Flush(); err != nil {
		t.Fatalf("Flush: %v", err)
	}
	if err := img.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	testutil.QemuCheck(t, top)
	qdCompareCheck(t, top)

	// Phase 2: reopen, rewrite what phase 1 wrote (in place), write more.
	img, err = disk.Open(top, open)
	if err != nil {
		t.Fatalf("reopen: %v", err)
	}
	ops = qdGenCvdOps(rng, tc.size, cs, tc.ops/2, touched, nil)
	for _, o := range ops {
		touched = append(touched, qdApply(t, img, model, rng, o))
	}
	// Final pattern writes for qemu-io read -P, and a final zeroed range.
	// The ranges do not overlap, so each still holds its pattern at the end.
	var checks []string
	var final [][2]int64
	for len(final) < 5 {
		off, n := qdGenRange(rng, tc.size, cs, nil)
		if slices.ContainsFunc(final, func(r [2]int64) bool { return off < r[0]+r[1] && r[0] < off+n }) {
			continue
		}
		final = append(final, [2]int64{off, n})
		var pat byte
		if len(final) < 5 {
			pat = byte(rng.IntN(255) + 1)
			qdApply(t, img, model, rng, qdOp{kind: 'w', off: off, n: n, pat: pat})
		} else {
			qdApply(t, img, model, rng, qdOp{kind: 'z', off: off, n: n})
		}
		checks = append(checks, fmt.Sprintf("read -P %#x %d %d", pat, off, n))
	}
	if err := img.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}

	testutil.QemuCheck(t, top)
	qdCompareCheck(t, top)
	if tc.growRT {
		if n := binary.BigEndian.Uint32(qdParse(t, top).b[56:]); n < 2 {
			t.Errorf("refcount table has %d cluster(s): the case did not make it grow", n)
		}
	}
	modelPath := filepath.Join(dir, "model.raw")
	if err := os.WriteFile(modelPath, model, 0o644); err != nil {
		t.Fatal(err)
	}
	if !testutil.QemuCompare(t, top, modelPath) {
		out, _ := testutil.RunErr("qemu-img", "compare", top, modelPath)
		t.Fatalf("qemu-img compare: cvd's image differs from the model: %s", out)
	}
	qdQemuIO(t, "qcow2", top, checks)

	ro, err := disk.Open(top, disk.OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer ro.Close()
	ranges := qdRanges(rng, tc.size, cs, touched, false)
	qdCompareRanges(t, "cvd vs model", ro, bytes.NewReader(model), ranges)
	qdCompareRanges(t, "go-qcow2reader vs model", qdOpenThirdReader(t, top), bytes.NewReader(model), ranges)
	chain := qdChain{size: tc.size, layers: append(slices.Clone(tc.backing), qdLayer{cluster: cs})}
	qdCompareChainMap(t, ro, top, chain)
	qdCompareLayerMap(t, ro, false)
}

// qdGenCvdOps draws operations for cvd: random-data writes, constant-pattern
// writes, rewrites of earlier ranges, zero writes and discards, unaligned.
func qdGenCvdOps(rng *rand.Rand, size, cs int64, n int, earlier [][2]int64, hot []int64) []qdOp {
	ops := make([]qdOp, 0, n)
	for range n {
		off, ln := qdGenRange(rng, size, cs, hot)
		if len(earlier) > 0 && rng.IntN(2) == 0 {
			e := earlier[rng.IntN(len(earlier))]
			off = min(max(e[0]+rng.Int64N(65)-32, 0), size-1)
			ln = min(max(e[1]+rng.Int64N(65)-32, 1), size-off)
		}
		r := rng.IntN(100)
		switch {
		case r < 45:
			ops = append(ops, qdOp{kind: 'w', off: off, n: ln, random: true})
		case r < 65:
			ops = append(ops, qdOp{kind: 'w', off: off, n: ln, pat: byte(rng.IntN(256))})
		case r < 82:
			ops = append(ops, qdOp{kind: 'z', off: off, n: ln})
		default:
			ops = append(ops, qdOp{kind: 'd', off: off, n: ln})
		}
	}
	return ops
}

// qdModel is what qdApply keeps in step with the image.
type qdModel interface {
	write(off int64, p []byte)
	zero(off, n int64)
}

type qdFlat []byte

func (m qdFlat) write(off int64, p []byte) { copy(m[off:], p) }
func (m qdFlat) zero(off, n int64)         { clear(m[off : off+n]) }

// qdApply runs one operation on img and on the model, and returns its range.
func qdApply(t testing.TB, img disk.Image, model any, rng *rand.Rand, o qdOp) [2]int64 {
	t.Helper()
	var m qdModel
	switch v := model.(type) {
	case []byte:
		m = qdFlat(v)
	case qdModel:
		m = v
	}
	switch o.kind {
	case 'w':
		p := make([]byte, o.n)
		if o.random {
			for i := 0; i < len(p); i += 8 {
				var b [8]byte
				binary.LittleEndian.PutUint64(b[:], rng.Uint64())
				copy(p[i:], b[:])
			}
		} else if o.pat != 0 {
			for i := range p {
				p[i] = o.pat
			}
		}
		if n, err := img.WriteAt(p, o.off); err != nil || n != len(p) {
			t.Fatalf("WriteAt(%d bytes at %d) = %d, %v", len(p), o.off, n, err)
		}
		m.write(o.off, p)
	case 'z':
		if err := img.WriteZeroes(o.off, o.n); err != nil {
			t.Fatalf("WriteZeroes(%d, %d): %v", o.off, o.n, err)
		}
		m.zero(o.off, o.n)
	case 'd':
		if err := img.Discard(o.off, o.n); err != nil {
			t.Fatalf("Discard(%d, %d): %v", o.off, o.n, err)
		}
		m.zero(o.off, o.n)
	}
	return [2]int64{o.off, o.n}
}

// ---------------------------------------------------------------------------
// 10,000 operations on a three-deep chain

// qdSparse is a sparse in-memory disk of 4 KiB blocks; absent blocks are zeros.
type qdSparse struct {
	size   int64
	blocks map[int64][]byte
}

const qdBlock = 4096

func newQdSparse(size int64) *qdSparse { return &qdSparse{size: size, blocks: map[int64][]byte{}} }

func (m *qdSparse) write(off int64, p []byte) {
	for len(p) > 0 {
		k, o := off/qdBlock, off%qdBlock
		b := m.blocks[k]
		if b == nil {
			b = make([]byte, qdBlock)
			m.blocks[k] = b
		}
		n := copy(b[o:], p)
		p, off = p[n:], off+int64(n)
	}
}

func (m *qdSparse) zero(off, n int64) {
	for end := off + n; off < end; {
		k, o := off/qdBlock, off%qdBlock
		c := min(qdBlock-o, end-off)
		if b := m.blocks[k]; b != nil {
			if o == 0 && c == qdBlock {
				delete(m.blocks, k)
			} else {
				clear(b[o : o+c])
			}
		}
		off += c
	}
}

func (m *qdSparse) ReadAt(p []byte, off int64) (int, error) {
	if off+int64(len(p)) > m.size {
		return 0, io.EOF
	}
	for i := 0; i < len(p); {
		k, o := (off+int64(i))/qdBlock, (off+int64(i))%qdBlock
		var n int
		if b := m.blocks[k]; b != nil {
			n = copy(p[i:], b[o:])
		} else {
			n = int(min(int64(len(p)-i), qdBlock-o))
			clear(p[i : i+n])
		}
		i += n
	}
	return len(p), nil
}

// runs returns the stored blocks as sorted, coalesced ranges.
func (m *qdSparse) runs() [][2]int64 {
	keys := make([]int64, 0, len(m.blocks))
	for k := range m.blocks {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	var r [][2]int64
	for _, k := range keys {
		if n := len(r); n > 0 && r[n-1][0]+r[n-1][1] == k*qdBlock && r[n-1][1] < 4*qdMiB {
			r[n-1][1] += qdBlock
			continue
		}
		r = append(r, [2]int64{k * qdBlock, qdBlock})
	}
	return r
}

// writeFile writes the model as a sparse raw file.
func (m *qdSparse) writeFile(t testing.TB, path string) {
	t.Helper()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(m.size); err != nil {
		t.Fatal(err)
	}
	for k, b := range m.blocks {
		if _, err := f.WriteAt(b[:min(qdBlock, m.size-k*qdBlock)], k*qdBlock); err != nil {
			t.Fatal(err)
		}
	}
}

// qdApplyQemu applies qemu-io operations to the model with QEMU's exact
// meaning (discards are whole v3 clusters: they read back as zeros).
func (m *qdSparse) applyQemu(ops []qdOp) {
	for _, o := range ops {
		switch o.kind {
		case 'w':
			m.write(o.off, bytes.Repeat([]byte{o.pat}, int(o.n)))
		default:
			m.zero(o.off, o.n)
		}
	}
}

// TestQemuDiffRandomOps10k: a three-deep chain whose two lower layers qemu-io
// wrote (the bottom one shorter than the others, the middle one with another
// cluster size), and a top that cvd creates and changes with 10,000 random
// writes, zero writes and discards, unaligned, aimed at cluster and L2-table
// boundaries. Afterwards cvd, qemu-img convert -O raw, go-qcow2reader and the
// model agree byte for byte, and every layer checks clean.
func TestQemuDiffRandomOps10k(t *testing.T) {
	testutil.NeedQemu(t)
	nops := 10000
	if testing.Short() {
		nops = 1000
	}
	tests := []struct {
		name     string
		cluster  int64
		size     int64
		baseSize int64
		midCS    int64
		hot      int // offsets the operations aim at
	}{
		{name: "4K clusters", cluster: 4 * qdKiB, size: 64 * qdMiB, baseSize: 40 * qdMiB, midCS: 64 * qdKiB, hot: 64},
		{name: "64K clusters", cluster: 64 * qdKiB, size: 2 * qdGiB, baseSize: 1200 * qdMiB, midCS: 4 * qdKiB, hot: 48},
		{name: "2M clusters", cluster: 2 * qdMiB, size: qdTiB + 4*qdGiB, baseSize: 600 * qdGiB, midCS: 64 * qdKiB, hot: 20},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			rng := qdRand(t)
			dir := qdTempDir(t)
			cs := tc.cluster
			l2span := cs * (cs / 8)
			// Hot offsets: L2-table boundaries of the top (and of the
			// layers below), the end of the short base, the ends of the disk.
			hot := []int64{qdHotOnly, 0, tc.size - 1, tc.baseSize, tc.baseSize - 1}
			for off := l2span; off < tc.size && len(hot) < tc.hot*5/8; off += l2span {
				hot = append(hot, off)
			}
			for off := tc.midCS * (tc.midCS / 8); off < tc.size && len(hot) < tc.hot*7/8; off += tc.midCS * (tc.midCS / 8) * 3 {
				hot = append(hot, off)
			}
			for len(hot) < tc.hot+1 {
				hot = append(hot, rng.Int64N(tc.size/cs)*cs)
			}
			t.Logf("%d hot offsets, L2 span %d", len(hot)-1, l2span)

			model := newQdSparse(tc.size)
			base := filepath.Join(dir, "base.qcow2")
			mid := filepath.Join(dir, "mid.qcow2")
			top := filepath.Join(dir, "top.qcow2")
			for _, p := range []string{base, mid, top} {
				testutil.CheckOnCleanup(t, p)
			}
			testutil.Run(t, "qemu-img", "create", "-q", "-f", "qcow2", "-o", fmt.Sprintf("cluster_size=%d", cs), base, strconv.FormatInt(tc.baseSize, 10))
			baseOps := qdGenQemuOps(rng, tc.baseSize, cs, 300, hot, true)
			qdQemuIO(t, "qcow2", base, qdQemuCmds(baseOps))
			model.applyQemu(baseOps)
			testutil.Run(t, "qemu-img", "create", "-q", "-f", "qcow2", "-o", fmt.Sprintf("cluster_size=%d", tc.midCS), "-b", "base.qcow2", "-F", "qcow2", mid, strconv.FormatInt(tc.size, 10))
			midOps := qdGenQemuOps(rng, tc.size, tc.midCS, 300, hot, true)
			qdQemuIO(t, "qcow2", mid, qdQemuCmds(midOps))
			model.applyQemu(midOps)

			// The model must agree with QEMU before cvd writes anything.
			modelPath := filepath.Join(dir, "model.raw")
			model.writeFile(t, modelPath)
			if !testutil.QemuCompare(t, mid, modelPath) {
				t.Fatal("the model of the qemu-io writes differs from QEMU's view: the test is wrong")
			}

			img, err := disk.Create(top, disk.CreateOptions{Size: tc.size, ClusterSize: int(cs), BackingFile: mid, BackingFormat: disk.FormatQcow2})
			if err != nil {
				t.Fatalf("disk.Create: %v", err)
			}
			var touched [][2]int64
			ops := qdGenCvdOps(rng, tc.size, cs, nops/2, nil, hot)
			ops = append(ops, qdGenCvdOps(rng, tc.size, cs, nops-len(ops), qdOpRanges(ops), hot)...)
			for i, o := range ops {
				touched = append(touched, qdApply(t, img, model, rng, o))
				if i%2500 == 2499 {
					if err := img.Flush(); err != nil {
						t.Fatalf("Flush after %d operations: %v", i+1, err)
					}
				}
			}
			if err := img.Close(); err != nil {
				t.Fatalf("Close: %v", err)
			}
			for _, p := range []string{base, mid, top} {
				testutil.QemuCheck(t, p)
				qdCompareCheck(t, p)
			}

			ro, err := disk.Open(top, disk.OpenOptions{ReadOnly: true})
			if err != nil {
				t.Fatal(err)
			}
			defer ro.Close()
			// Ranges: everything the model holds, everything cvd says holds
			// data, the touched ranges, random ones.
			ranges := model.runs()
			ce, err := disk.MapChain(ro, 0, tc.size)
			if err != nil {
				t.Fatalf("MapChain: %v", err)
			}
			for _, e := range ce {
				if e.Depth >= 0 && !e.Zero {
					for off := e.Off; off < e.Off+e.Len; off += 4 * qdMiB {
						ranges = append(ranges, [2]int64{off, min(4*qdMiB, e.Off+e.Len-off)})
					}
				}
			}
			ranges = append(ranges, qdRanges(rng, tc.size, cs, touched[:min(len(touched), 2000)], true)...)
			t.Logf("%d operations, model holds %d MiB, comparing %d ranges", len(ops), len(model.blocks)*qdBlock>>20, len(ranges))

			qdCompareRanges(t, "cvd vs model", ro, model, ranges)
			qdCompareRanges(t, "qemu-img convert vs model", qdQemuRaw(t, top), model, ranges)
			qdCompareRanges(t, "go-qcow2reader vs model", qdOpenThirdReader(t, top), model, ranges)
			model.writeFile(t, modelPath)
			if !testutil.QemuCompare(t, top, modelPath) {
				out, _ := testutil.RunErr("qemu-img", "compare", top, modelPath)
				t.Fatalf("qemu-img compare of the chain and the model: %s", out)
			}
			qdCompareChainMap(t, ro, top, qdChain{size: tc.size, layers: []qdLayer{{size: tc.baseSize, cluster: cs}, {cluster: tc.midCS}, {cluster: cs}}})
		})
	}
}

func qdOpRanges(ops []qdOp) [][2]int64 {
	r := make([][2]int64, len(ops))
	for i, o := range ops {
		r[i] = [2]int64{o.off, o.n}
	}
	return r
}

// ---------------------------------------------------------------------------
// concurrency

// TestQemuDiffConcurrentReadsWhileWriting: many goroutines read (and map) the
// chain while one writes, with copy-on-write from the backing file, rewrites
// and zero writes. Every 512-byte sector a reader sees holds one of the
// contents that sector had at some point; at the end the image holds the last
// ones and checks clean. Run with -race.
func TestQemuDiffConcurrentReadsWhileWriting(t *testing.T) {
	testutil.NeedQemu(t)
	rng := qdRand(t)
	dir := qdTempDir(t)
	const (
		size    = 8 << 20
		cs      = 64 << 10
		sectors = size / 512
	)
	base := filepath.Join(dir, "base.qcow2")
	top := filepath.Join(dir, "top.qcow2")
	testutil.CheckOnCleanup(t, base)
	testutil.CheckOnCleanup(t, top)

	// history[s] lists every byte sector s is uniformly filled with, over time.
	history := make([][]byte, sectors)
	for s := range history {
		history[s] = []byte{byte(s/(cs/512))%250 + 1}
	}
	b, err := disk.Create(base, disk.CreateOptions{Size: size, ClusterSize: cs})
	if err != nil {
		t.Fatalf("disk.Create base: %v", err)
	}
	buf := make([]byte, cs)
	for c := int64(0); c < size/cs; c++ {
		for i := range buf {
			buf[i] = history[c*cs/512][0]
		}
		if _, err := b.WriteAt(buf, c*cs); err != nil {
			t.Fatal(err)
		}
	}
	if err := b.Close(); err != nil {
		t.Fatal(err)
	}

	// The writer's schedule: sector-aligned writes (part clusters, whole
	// clusters, several clusters), zero writes; decided up front so the
	// readers know every value a sector may hold.
	type wop struct {
		off, n int64
		pat    byte // 0: WriteZeroes
	}
	var sched []wop
	for range 600 {
		s := rng.Int64N(sectors)
		n := (1 + rng.Int64N(3*cs/512)) * 512
		n = min(n, size-s*512)
		pat := byte(rng.IntN(255) + 1)
		if rng.IntN(8) == 0 {
			pat = 0
		}
		sched = append(sched, wop{off: s * 512, n: n, pat: pat})
		for k := s; k < s+n/512; k++ {
			history[k] = append(history[k], pat)
		}
	}

	img, err := disk.Create(top, disk.CreateOptions{BackingFile: base, BackingFormat: disk.FormatQcow2})
	if err != nil {
		t.Fatalf("disk.Create top: %v", err)
	}
	var done atomic.Bool
	var wg sync.WaitGroup
	errs := make(chan error, 16)
	fail := func(err error) {
		select {
		case errs <- err:
		default:
		}
	}
	for r := range 6 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rr := rand.New(rand.NewPCG(uint64(r), 99))
			p := make([]byte, 3*cs)
			for !done.Load() {
				s := rr.Int64N(sectors)
				n := min((1+rr.Int64N(3*cs/512))*512, size-s*512)
				if err := qdReadFull(img, p[:n], s*512); err != nil {
					fail(err)
					return
				}
				for k := int64(0); k < n/512; k++ {
					sec := p[k*512 : (k+1)*512]
					v := sec[0]
					if !bytes.Equal(sec, bytes.Repeat([]byte{v}, 512)) || !slices.Contains(history[s+k], v) {
						fail(fmt.Errorf("sector %d (offset %d) read %#02x... which it never held (history %v)", s+k, (s+k)*512, v, history[s+k]))
						return
					}
				}
			}
		}()
	}
	wg.Add(1)
	go func() {
		defer wg.Done()
		for !done.Load() {
			if _, err := img.MapLayer(0, size); err != nil {
				fail(fmt.Errorf("MapLayer: %w", err))
				return
			}
			if _, err := disk.MapChain(img, 0, size); err != nil {
				fail(fmt.Errorf("MapChain: %w", err))
				return
			}
			_ = img.Info()
		}
	}()
	wbuf := make([]byte, 3*cs)
	for _, w := range sched {
		if w.pat == 0 {
			if err := img.WriteZeroes(w.off, w.n); err != nil {
				t.Errorf("WriteZeroes: %v", err)
				break
			}
			continue
		}
		p := wbuf[:w.n]
		for i := range p {
			p[i] = w.pat
		}
		if _, err := img.WriteAt(p, w.off); err != nil {
			t.Errorf("WriteAt: %v", err)
			break
		}
	}
	done.Store(true)
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	final := make([]byte, size)
	for s := range history {
		for i := range 512 {
			final[s*512+i] = history[s][len(history[s])-1]
		}
	}
	qdCompareRanges(t, "after the writes", img, bytes.NewReader(final), qdRanges(rng, size, cs, nil, false))
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	finalPath := filepath.Join(dir, "final.raw")
	if err := os.WriteFile(finalPath, final, 0o644); err != nil {
		t.Fatal(err)
	}
	if !testutil.QemuCompare(t, top, finalPath) {
		t.Fatal("qemu-img compare: the image differs from the writer's schedule")
	}
}

// ---------------------------------------------------------------------------
// helpers

// qdRand returns the test's random generator. The seed (CVD_TEST_SEED, or a
// fixed default) is logged; the test name is mixed in so subtests differ.
func qdRand(t testing.TB) *rand.Rand {
	t.Helper()
	seed := uint64(20260515)
	if s := os.Getenv("CVD_TEST_SEED"); s != "" {
		v, err := strconv.ParseUint(s, 0, 64)
		if err != nil {
			t.Fatalf("CVD_TEST_SEED=%q: %v", s, err)
		}
		seed = v
	}
	t.Logf("seed %d (CVD_TEST_SEED=%d reproduces this run)", seed, seed)
	h := fnv.New64a()
	h.Write([]byte(t.Name()))
	return rand.New(rand.NewPCG(seed, h.Sum64()))
}

// qdTempDir is t.TempDir, or a kept directory under $CVD_TEST_KEEP to look at
// the images after the test.
func qdTempDir(t testing.TB) string {
	t.Helper()
	keep := os.Getenv("CVD_TEST_KEEP")
	if keep == "" {
		return t.TempDir()
	}
	dir := filepath.Join(keep, strings.NewReplacer("/", "_", " ", "-").Replace(t.Name()))
	os.RemoveAll(dir)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	t.Logf("images kept in %s", dir)
	return dir
}
