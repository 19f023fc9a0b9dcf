package overlay

import (
	"bytes"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/cvd-project/cvd/disk"
	"github.com/cvd-project/cvd/internal/testutil"
)

// seed returns the seed of a random test (CVD_TEST_SEED, or the clock) and logs it.
func seed(t testing.TB) uint64 {
	t.Helper()
	s := uint64(time.Now().UnixNano())
	if v := os.Getenv("CVD_TEST_SEED"); v != "" {
		n, err := strconv.ParseUint(v, 10, 64)
		if err != nil {
			t.Fatalf("CVD_TEST_SEED=%q: %v", v, err)
		}
		s = n
	}
	t.Logf("seed %d (rerun with CVD_TEST_SEED=%d)", s, s)
	return s
}

// lab makes images in a temporary directory.
type lab struct {
	t   testing.TB
	dir string
	rng *rand.Rand
	n   int
}

func newLab(t testing.TB, s uint64) *lab {
	return &lab{t: t, dir: t.TempDir(), rng: rand.New(rand.NewPCG(s, s^0x9e3779b97f4a7c15))}
}

// create makes a qcow2 image (on backing, when not "") and registers a qemu-img
// check of it at the end of the test.
func (l *lab) create(name, backing string, size int64, cs int) string {
	l.t.Helper()
	l.n++
	p := filepath.Join(l.dir, fmt.Sprintf("%02d-%s.qcow2", l.n, name))
	err := disk.CreateFile(p, disk.CreateOptions{Size: size, ClusterSize: cs, BackingFile: backing,
		BackingFormat: formatOf(backing), AllowedRoots: []string{l.dir}})
	if err != nil {
		l.t.Fatalf("create %s: %v", p, err)
	}
	testutil.CheckOnCleanup(l.t, p)
	return p
}

func formatOf(p string) disk.Format {
	if p == "" {
		return ""
	}
	return disk.FormatQcow2
}

// open opens path with its chain; it is closed at the end of the test.
func (l *lab) open(path string, readOnly bool) disk.Image {
	l.t.Helper()
	img, err := disk.Open(path, disk.OpenOptions{ReadOnly: readOnly, AllowedRoots: []string{l.dir}})
	if err != nil {
		l.t.Fatalf("open %s: %v", path, err)
	}
	l.t.Cleanup(func() { img.Close() })
	return img
}

// scribble makes ops random changes to the image at path: data (random, a
// pattern, or what the guest already sees there), zeros, discards, partial
// clusters.
func (l *lab) scribble(path string, ops int) {
	l.t.Helper()
	img, err := disk.Open(path, disk.OpenOptions{AllowedRoots: []string{l.dir}})
	if err != nil {
		l.t.Fatalf("open %s: %v", path, err)
	}
	defer img.Close()
	cs := int64(img.Info().ClusterSize)
	size := img.Size()
	r := l.rng
	for range ops {
		off := r.Int64N(size)
		n := min(size-off, 1+r.Int64N(4*cs))
		if r.IntN(3) > 0 { // mostly whole clusters
			off = off / cs * cs
			n = min(size-off, (1+r.Int64N(4))*cs)
		}
		switch k := r.IntN(10); {
		case k < 5:
			buf := make([]byte, n)
			if r.IntN(2) == 0 {
				for i := range buf {
					buf[i] = byte(r.IntN(256))
				}
			} else {
				v := byte(1 + r.IntN(3)) // few patterns, so that layers collide
				for i := range buf {
					buf[i] = v
				}
			}
			if _, err := img.WriteAt(buf, off); err != nil {
				l.t.Fatalf("write %s: %v", path, err)
			}
		case k < 7: // rewrite what is already seen: allocated, same content
			buf := make([]byte, n)
			if err := readView(img, buf, off); err != nil {
				l.t.Fatal(err)
			}
			if _, err := img.WriteAt(buf, off); err != nil {
				l.t.Fatalf("write %s: %v", path, err)
			}
		case k < 9:
			if err := img.WriteZeroes(off, n); err != nil {
				l.t.Fatalf("zero %s: %v", path, err)
			}
		default:
			if err := img.Discard(off, n); err != nil {
				l.t.Fatalf("discard %s: %v", path, err)
			}
		}
	}
	if err := img.Flush(); err != nil {
		l.t.Fatal(err)
	}
}

// bruteDiff compares every cluster of granularity g of the guest views of a and b.
func bruteDiff(t testing.TB, a, b disk.Image, g int64) []Range {
	t.Helper()
	end := max(a.Size(), b.Size())
	ba, bb := make([]byte, g), make([]byte, g)
	var out []Range
	for off := int64(0); off < end; off += g {
		n := min(g, end-off)
		if err := readView(a, ba[:n], off); err != nil {
			t.Fatal(err)
		}
		if err := readView(b, bb[:n], off); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(ba[:n], bb[:n]) {
			out = appendMerged(out, Range{off, n})
		}
	}
	return out
}

// guestHash reads the whole guest view (for small test disks).
func guestView(t testing.TB, img disk.Image) []byte {
	t.Helper()
	buf := make([]byte, img.Size())
	if err := readView(img, buf, 0); err != nil {
		t.Fatal(err)
	}
	return buf
}
