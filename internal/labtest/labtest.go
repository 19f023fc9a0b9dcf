// Package labtest makes qcow2 images for the tests of the packages that work on
// chains (overlay, desktop): a temporary directory, seeded random contents, a
// qemu-img check of every image it made when the test ends.
package labtest

import (
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

// Seed returns the seed of a random test (CVD_TEST_SEED, or the clock) and logs it.
func Seed(t testing.TB) uint64 {
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

// Lab makes images in a temporary directory (Dir), with a seeded random source
// (Rng) for what it writes.
type Lab struct {
	T   testing.TB
	Dir string
	Rng *rand.Rand
	n   int
}

// New is a lab in a new temporary directory, its random source seeded with s.
func New(t testing.TB, s uint64) *Lab {
	return &Lab{T: t, Dir: t.TempDir(), Rng: rand.New(rand.NewPCG(s, s^0x9e3779b97f4a7c15))}
}

// Create makes a qcow2 image (on backing, when not "") and registers a qemu-img
// check of it at the end of the test.
func (l *Lab) Create(name, backing string, size int64, cs int) string {
	l.T.Helper()
	l.n++
	p := filepath.Join(l.Dir, fmt.Sprintf("%02d-%s.qcow2", l.n, name))
	err := disk.CreateFile(p, disk.CreateOptions{Size: size, ClusterSize: cs, BackingFile: backing,
		BackingFormat: formatOf(backing), AllowedRoots: []string{l.Dir}})
	if err != nil {
		l.T.Fatalf("create %s: %v", p, err)
	}
	testutil.CheckOnCleanup(l.T, p)
	return p
}

func formatOf(p string) disk.Format {
	if p == "" {
		return ""
	}
	return disk.FormatQcow2
}

// Open opens path with its chain; it is closed at the end of the test.
func (l *Lab) Open(path string, readOnly bool) disk.Image {
	l.T.Helper()
	img, err := disk.Open(path, disk.OpenOptions{ReadOnly: readOnly, AllowedRoots: []string{l.Dir}})
	if err != nil {
		l.T.Fatalf("open %s: %v", path, err)
	}
	l.T.Cleanup(func() { img.Close() })
	return img
}

// Scribble makes ops random changes to the image at path: data (random, a
// pattern, or what the guest already sees there), zeros, discards, partial
// clusters.
func (l *Lab) Scribble(path string, ops int) {
	l.T.Helper()
	img, err := disk.Open(path, disk.OpenOptions{AllowedRoots: []string{l.Dir}})
	if err != nil {
		l.T.Fatalf("open %s: %v", path, err)
	}
	defer img.Close()
	cs := int64(img.Info().ClusterSize)
	size := img.Size()
	r := l.Rng
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
				l.T.Fatalf("write %s: %v", path, err)
			}
		case k < 7: // rewrite what is already seen: allocated, same content
			buf := make([]byte, n)
			if err := disk.ReadView(img, buf, off); err != nil {
				l.T.Fatal(err)
			}
			if _, err := img.WriteAt(buf, off); err != nil {
				l.T.Fatalf("write %s: %v", path, err)
			}
		case k < 9:
			if err := img.WriteZeroes(off, n); err != nil {
				l.T.Fatalf("zero %s: %v", path, err)
			}
		default:
			if err := img.Discard(off, n); err != nil {
				l.T.Fatalf("discard %s: %v", path, err)
			}
		}
	}
	if err := img.Flush(); err != nil {
		l.T.Fatal(err)
	}
}

// GuestView reads the whole guest view (for small test disks).
func GuestView(t testing.TB, img disk.Image) []byte {
	t.Helper()
	buf := make([]byte, img.Size())
	if err := disk.ReadView(img, buf, 0); err != nil {
		t.Fatal(err)
	}
	return buf
}

// FlatCopy writes the guest view of path into a standalone image with qemu-img.
func FlatCopy(t testing.TB, path string) string {
	t.Helper()
	out := filepath.Join(t.TempDir(), "flat-"+filepath.Base(path))
	testutil.Run(t, "qemu-img", "convert", "-O", "qcow2", path, out)
	return out
}
