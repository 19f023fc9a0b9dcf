package disk_test

import (
	"bytes"
	"context"
	"encoding/json"
	"math/rand"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/cvd-project/cvd/disk"
	"github.com/cvd-project/cvd/internal/testutil"
)

func seededRand(t *testing.T) *rand.Rand {
	t.Helper()
	seed := time.Now().UnixNano()
	t.Logf("seed %d", seed)
	return rand.New(rand.NewSource(seed))
}

// rawOf reads a whole image through qemu-img convert.
func rawOf(t *testing.T, path string) []byte {
	t.Helper()
	out := filepath.Join(t.TempDir(), "raw")
	testutil.Run(t, "qemu-img", "convert", "-O", "raw", path, out)
	b, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func readAll(t *testing.T, img disk.Image) []byte {
	t.Helper()
	b := make([]byte, img.Size())
	if _, err := img.ReadAt(b, 0); err != nil {
		t.Fatal(err)
	}
	return b
}

func qemuIO(t *testing.T, path string, cmds ...string) {
	t.Helper()
	args := []string{"-f", "qcow2"}
	for _, c := range cmds {
		args = append(args, "-c", c)
	}
	testutil.Run(t, "qemu-io", append(args, path)...)
}

// TestRandomWritesMatchReference applies the same random writes, zeroes and
// discards to a cvd image and to a byte slice, across cluster sizes and with and
// without a backing file, then asks QEMU to check and compare.
func TestRandomWritesMatchReference(t *testing.T) {
	testutil.NeedQemu(t)
	for _, tc := range []struct {
		name    string
		cs      int
		backing bool
	}{
		{"512B", 512, false}, {"512B-overlay", 512, true},
		{"4K", 4096, false}, {"64K-overlay", 65536, true},
		{"2M", 2 << 20, false}, {"2M-overlay", 2 << 20, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rng := seededRand(t)
			dir := t.TempDir()
			const size = 48<<20 + 12800 // not cluster-aligned on purpose
			ref := make([]byte, size)
			path := filepath.Join(dir, "top.qcow2")
			opts := disk.CreateOptions{Size: size, ClusterSize: tc.cs}
			if tc.backing {
				base := filepath.Join(dir, "base.qcow2")
				testutil.Run(t, "qemu-img", "create", "-q", "-f", "qcow2", base, "40M")
				qemuIO(t, base, "write -P 0x5a 0 8M", "write -P 0x6b 20M 4M", "write -z 30M 2M")
				copy(ref, rawOf(t, base))
				opts = disk.CreateOptions{Size: size, ClusterSize: tc.cs, BackingFile: base}
				testutil.CheckOnCleanup(t, base)
			}
			testutil.CheckOnCleanup(t, path)
			img, err := disk.Create(path, opts)
			if err != nil {
				t.Fatal(err)
			}
			for i := 0; i < 400; i++ {
				off := rng.Int63n(size)
				n := min(rng.Int63n(3*int64(tc.cs)+200000)+1, size-off)
				switch rng.Intn(5) {
				case 0:
					if err := img.WriteZeroes(off, n); err != nil {
						t.Fatal(err)
					}
					clear(ref[off : off+n])
				case 1:
					if err := img.Discard(off, n); err != nil {
						t.Fatal(err)
					}
					clear(ref[off : off+n])
				default:
					b := make([]byte, n)
					rng.Read(b)
					if _, err := img.WriteAt(b, off); err != nil {
						t.Fatal(err)
					}
					copy(ref[off:], b)
				}
			}
			if got := readAll(t, img); !bytes.Equal(got, ref) {
				t.Fatal("cvd reads differ from the reference")
			}
			if err := img.Close(); err != nil {
				t.Fatal(err)
			}
			r, err := disk.Check(path, false)
			if err != nil || !r.Clean() {
				t.Fatalf("cvd check: %+v %v", r, err)
			}
			if got := rawOf(t, path); !bytes.Equal(got, ref) {
				t.Fatal("QEMU reads differ from the reference")
			}
		})
	}
}

// TestReadQemuCompressed reads deflate and zstd compressed images QEMU made.
func TestReadQemuCompressed(t *testing.T) {
	testutil.NeedQemu(t)
	dir := t.TempDir()
	src := filepath.Join(dir, "src.qcow2")
	rnd := make([]byte, 3<<20)
	rand.New(rand.NewSource(7)).Read(rnd)
	// Half-random clusters compress a little; patterns compress a lot.
	for i := range rnd {
		if (i/4096)%2 == 0 {
			rnd[i] = byte(i / 4096)
		}
	}
	rf := filepath.Join(dir, "rnd")
	os.WriteFile(rf, rnd, 0o644)
	testutil.Run(t, "qemu-img", "convert", "-f", "raw", "-O", "qcow2", rf, src)
	testutil.Run(t, "qemu-img", "resize", "-q", src, "32M")
	qemuIO(t, src, "write -P 0x22 10M 5M", "write -z 16M 1M")
	want := rawOf(t, src)
	for _, ct := range []string{"zlib", "zstd"} {
		t.Run(ct, func(t *testing.T) {
			c := filepath.Join(dir, "c-"+ct+".qcow2")
			testutil.Run(t, "qemu-img", "convert", "-c", "-O", "qcow2", "-o", "compression_type="+ct, src, c)
			img, err := disk.Open(c, disk.OpenOptions{ReadOnly: true})
			if err != nil {
				t.Fatal(err)
			}
			defer img.Close()
			if got := readAll(t, img); !bytes.Equal(got, want) {
				t.Fatal("compressed image reads differently")
			}
			r, err := disk.Check(c, false)
			if err != nil || !r.Clean() || r.CompressedClusters == 0 {
				t.Fatalf("check of QEMU's compressed image: %+v %v", r, err)
			}
		})
	}
}

// TestConvertCompressed writes compressed images that QEMU must accept.
func TestConvertCompressed(t *testing.T) {
	testutil.NeedQemu(t)
	dir := t.TempDir()
	src := filepath.Join(dir, "src.qcow2")
	img, err := disk.Create(src, disk.CreateOptions{Size: 24 << 20})
	if err != nil {
		t.Fatal(err)
	}
	rng := rand.New(rand.NewSource(3))
	text := []byte(strings.Repeat("cvd compresses clusters one by one. ", 2000))
	img.WriteAt(text, 1<<20)
	rb := make([]byte, 2<<20)
	rng.Read(rb)
	img.WriteAt(rb, 8<<20) // incompressible: stored plain
	img.WriteAt(text[:100], 20<<20+5)
	img.Close()
	for _, comp := range []string{"deflate", "zstd"} {
		for _, cs := range []int{4096, 65536} {
			t.Run(comp+"-"+itoa(cs), func(t *testing.T) {
				dst := filepath.Join(t.TempDir(), "out.qcow2")
				s, err := disk.Open(src, disk.OpenOptions{ReadOnly: true})
				if err != nil {
					t.Fatal(err)
				}
				defer s.Close()
				if err := disk.Convert(context.Background(), s, dst, disk.ConvertOptions{Compress: comp, ClusterSize: cs}); err != nil {
					t.Fatal(err)
				}
				testutil.QemuCheck(t, dst)
				if !testutil.QemuCompare(t, src, dst) {
					t.Fatal("qemu-img compare: converted image differs")
				}
				r, err := disk.Check(dst, false)
				if err != nil || !r.Clean() || r.CompressedClusters == 0 {
					t.Fatalf("cvd check: %+v %v", r, err)
				}
				fi, _ := os.Stat(dst)
				if fi.Size() > 6<<20 {
					t.Errorf("compressed output is %d bytes", fi.Size())
				}
				// Writing over compressed clusters must release them cleanly.
				w, err := disk.Open(dst, disk.OpenOptions{})
				if err != nil {
					t.Fatal(err)
				}
				if _, err := w.WriteAt([]byte("overwrite"), 1<<20+77); err != nil {
					t.Fatal(err)
				}
				if err := w.Discard(1<<20+int64(cs), int64(cs)*3); err != nil {
					t.Fatal(err)
				}
				w.Close()
				testutil.QemuCheck(t, dst)
			})
		}
	}
}

func itoa(n int) string { b, _ := json.Marshal(n); return string(b) }

// TestCheckCountsLikeQemu leaks and corrupts images on purpose and compares the
// counts with qemu-img check; --repair must leave QEMU seeing a clean image.
func TestCheckCountsLikeQemu(t *testing.T) {
	testutil.NeedQemu(t)
	dir := t.TempDir()
	path := filepath.Join(dir, "x.qcow2")
	testutil.Run(t, "qemu-img", "create", "-q", "-f", "qcow2", path, "16M")
	qemuIO(t, path, "write -P 1 0 1M", "write -P 2 4M 64k")
	img, err := disk.Open(path, disk.OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	img.Close()
	q := qemuCheckJSON(t, path)
	if q.Leaks != 0 || q.Corruptions != 0 {
		t.Fatalf("setup: %+v", q)
	}
	// Leak two clusters: grow the file to 40 clusters and give clusters 30 and
	// 31 a refcount of 1 in the refcount block QEMU puts at cluster 2.
	f, _ := os.OpenFile(path, os.O_RDWR, 0)
	f.Truncate(40 << 16)
	f.WriteAt([]byte{0, 1, 0, 1}, 2*65536+60)
	f.Close()
	q = qemuCheckJSON(t, path)
	r, err := disk.Check(path, false)
	if err != nil {
		t.Fatal(err)
	}
	if r.Leaks != q.Leaks || r.Corruptions != q.Corruptions || q.Leaks != 2 {
		t.Fatalf("cvd %+v, qemu %+v", r, q)
	}
	if r, err = disk.Check(path, true); err != nil || r.LeaksFixed != 2 {
		t.Fatalf("repair: %+v %v", r, err)
	}
	testutil.QemuCheck(t, path)

	// Corruption: point an L2 entry at a free cluster.
	f, _ = os.OpenFile(path, os.O_RDWR, 0)
	f.WriteAt([]byte{0x80, 0, 0, 0, 0, 0x30, 0, 0}, 0) // smashes the header magic
	f.Close()
	if _, err := disk.Check(path, false); err == nil {
		t.Fatal("check of a file with a broken magic succeeded")
	}
}

type qemuCheck struct {
	Leaks       int `json:"leaks"`
	Corruptions int `json:"corruptions"`
}

func qemuCheckJSON(t *testing.T, path string) qemuCheck {
	t.Helper()
	out, _ := testutil.RunErr("qemu-img", "check", "--output=json", path)
	var q qemuCheck
	if err := json.Unmarshal([]byte(out[strings.Index(out, "{"):]), &q); err != nil {
		t.Fatalf("qemu-img check json: %v\n%s", err, out)
	}
	return q
}

// TestRefcountWidthsAndGrowth writes into QEMU images with every refcount width
// and tiny clusters, so that refcount blocks and the refcount table must grow.
func TestRefcountWidthsAndGrowth(t *testing.T) {
	testutil.NeedQemu(t)
	for _, bits := range []string{"1", "2", "4", "8", "16", "32", "64"} {
		t.Run("refcount_bits="+bits, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "x.qcow2")
			testutil.Run(t, "qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=512,refcount_bits="+bits, path, "64M")
			img, err := disk.Open(path, disk.OpenOptions{})
			if err != nil {
				t.Fatal(err)
			}
			ref := make([]byte, 64<<20)
			rng := rand.New(rand.NewSource(int64(len(bits))))
			// 24 MiB of 512-byte clusters: ~49k clusters, far past one table cluster.
			for i := 0; i < 48; i++ {
				off := rng.Int63n(60 << 20)
				b := make([]byte, 512<<10)
				rng.Read(b)
				if _, err := img.WriteAt(b, off); err != nil {
					t.Fatal(err)
				}
				copy(ref[off:], b)
			}
			if got := readAll(t, img); !bytes.Equal(got, ref) {
				t.Fatal("reads differ")
			}
			img.Close()
			testutil.QemuCheck(t, path)
			if !bytes.Equal(rawOf(t, path), ref) {
				t.Fatal("QEMU reads differ")
			}
		})
	}
}

// TestSetBacking moves an overlay onto a copy of its backing file; QEMU must see
// the new name and format and the same guest view.
func TestSetBacking(t *testing.T) {
	testutil.NeedQemu(t)
	dir := t.TempDir()
	base := filepath.Join(dir, "base.qcow2")
	testutil.Run(t, "qemu-img", "create", "-q", "-f", "qcow2", base, "8M")
	qemuIO(t, base, "write -P 7 0 1M")
	top := filepath.Join(dir, "top.qcow2")
	img, err := disk.Create(top, disk.CreateOptions{BackingFile: base})
	if err != nil {
		t.Fatal(err)
	}
	img.WriteAt([]byte("top"), 4<<20)
	img.Close()
	copyPath := filepath.Join(dir, "sub", "base-copy.raw")
	os.MkdirAll(filepath.Dir(copyPath), 0o755)
	testutil.Run(t, "qemu-img", "convert", "-O", "raw", base, copyPath)
	if err := disk.SetBacking(top, "sub/base-copy.raw", disk.FormatRaw); err != nil {
		t.Fatal(err)
	}
	testutil.QemuCheck(t, top)
	out := testutil.Run(t, "qemu-img", "info", "--output=json", top)
	if !strings.Contains(out, `"backing-filename-format": "raw"`) || !strings.Contains(out, "sub/base-copy.raw") {
		t.Fatalf("qemu-img info after SetBacking:\n%s", out)
	}
	img, err = disk.Open(top, disk.OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	if img.Backing().Info().Format != disk.FormatRaw {
		t.Fatal("backing format not raw")
	}
	b := make([]byte, 3)
	img.ReadAt(b, 0)
	if b[0] != 7 {
		t.Fatalf("read through new backing: %v", b)
	}
	if err := disk.SetBacking(top, "x", ""); err == nil {
		t.Fatal("SetBacking without a format succeeded")
	}
}

// TestZeroClustersSurvivesNewBacking: ZeroClusters marks clusters zero even with
// no backing file, so a backing file set later does not show through.
func TestZeroClustersSurvivesNewBacking(t *testing.T) {
	testutil.NeedQemu(t)
	dir := t.TempDir()
	base := filepath.Join(dir, "base.qcow2")
	testutil.Run(t, "qemu-img", "create", "-q", "-f", "qcow2", base, "4M")
	qemuIO(t, base, "write -P 9 0 4M")
	top := filepath.Join(dir, "top.qcow2")
	img, err := disk.Create(top, disk.CreateOptions{Size: 4 << 20})
	if err != nil {
		t.Fatal(err)
	}
	z, ok := img.(interface{ ZeroClusters(off, n int64) error })
	if !ok {
		t.Fatal("qcow2 image lacks ZeroClusters")
	}
	if err := z.ZeroClusters(1<<20, 1<<20); err != nil {
		t.Fatal(err)
	}
	if err := img.WriteZeroes(2<<20, 1<<20); err != nil { // no flag: nothing below
		t.Fatal(err)
	}
	img.Close()
	if err := disk.SetBacking(top, "base.qcow2", disk.FormatQcow2); err != nil {
		t.Fatal(err)
	}
	testutil.QemuCheck(t, top)
	raw := rawOf(t, top)
	if raw[0] != 9 || raw[1<<20] != 0 || raw[2<<20-1] != 0 || raw[2<<20] != 9 {
		t.Fatalf("bytes at 0, 1M, 2M-1, 2M: %d %d %d %d", raw[0], raw[1<<20], raw[2<<20-1], raw[2<<20])
	}
}
