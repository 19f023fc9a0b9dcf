package disk_test

import (
	"errors"
	"math/rand"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/cvd-project/cvd/disk"
	"github.com/cvd-project/cvd/internal/testutil"
)

// TestBackingConfinement refuses backing names that leave the allowed roots,
// loops and over-deep chains, with the sentinel errors.
func TestBackingConfinement(t *testing.T) {
	testutil.NeedQemu(t)
	root := t.TempDir()
	outside := t.TempDir()
	secret := filepath.Join(outside, "secret.qcow2")
	testutil.Run(t, "qemu-img", "create", "-q", "-f", "qcow2", secret, "1M")
	inStore := filepath.Join(root, "layers", "base.qcow2")
	os.MkdirAll(filepath.Dir(inStore), 0o755)
	testutil.Run(t, "qemu-img", "create", "-q", "-f", "qcow2", inStore, "1M")
	os.MkdirAll(filepath.Join(root, "clones"), 0o755)
	os.Symlink(secret, filepath.Join(root, "layers", "link.qcow2"))

	mk := func(name, backing string) string {
		p := filepath.Join(root, "clones", name)
		testutil.Run(t, "qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", backing, "-F", "qcow2", p, "1M")
		return p
	}
	for _, tc := range []struct {
		name, backing string
		want          error
	}{
		{"relative inside the root", "../layers/base.qcow2", nil},
		{"absolute inside the root", inStore, nil},
		{"absolute outside", secret, disk.ErrBackingEscape},
		{"dot-dot escape", "../../" + filepath.Base(outside) + "/secret.qcow2", disk.ErrBackingEscape},
		{"symlink out of the root", "../layers/link.qcow2", disk.ErrBackingEscape},
		{"protocol", "json:{\"file.driver\":\"nbd\"}", disk.ErrBackingEscape},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := mk(strings.ReplaceAll(tc.name, " ", "-")+".qcow2", tc.backing)
			img, err := disk.Open(p, disk.OpenOptions{ReadOnly: true, AllowedRoots: []string{root}})
			if tc.want == nil {
				if err != nil {
					t.Fatal(err)
				}
				img.Close()
				return
			}
			if !errors.Is(err, tc.want) {
				t.Fatalf("got %v, want %v", err, tc.want)
			}
		})
	}

	t.Run("loop", func(t *testing.T) {
		a := filepath.Join(root, "a.qcow2")
		b := filepath.Join(root, "b.qcow2")
		testutil.Run(t, "qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", "b.qcow2", "-F", "qcow2", a, "1M")
		testutil.Run(t, "qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", "a.qcow2", "-F", "qcow2", b, "1M")
		if _, err := disk.Open(a, disk.OpenOptions{ReadOnly: true}); !errors.Is(err, disk.ErrBackingLoop) {
			t.Fatalf("got %v", err)
		}
	})
	t.Run("too deep", func(t *testing.T) {
		dir := t.TempDir()
		prev := filepath.Join(dir, "l0.qcow2")
		if err := disk.CreateFile(prev, disk.CreateOptions{Size: 1 << 20}); err != nil {
			t.Fatal(err)
		}
		for i := 1; i <= 8; i++ {
			p := filepath.Join(dir, "l"+strconv.Itoa(i)+".qcow2")
			if err := disk.CreateFile(p, disk.CreateOptions{BackingFile: prev, BackingFormat: disk.FormatQcow2, Size: 1 << 20}); err != nil {
				t.Fatal(err)
			}
			prev = p
		}
		if _, err := disk.Open(prev, disk.OpenOptions{ReadOnly: true, MaxDepth: 8}); !errors.Is(err, disk.ErrChainTooDeep) {
			t.Fatalf("9 layers with MaxDepth 8: got %v", err)
		}
		img, err := disk.Open(prev, disk.OpenOptions{ReadOnly: true, MaxDepth: 9})
		if err != nil {
			t.Fatal(err)
		}
		if n := len(disk.Layers(img)); n != 9 {
			t.Fatalf("%d layers", n)
		}
		img.Close()
	})
}

// TestForeignFormatsNamed: formats cvd does not handle get a clear error.
func TestForeignFormatsNamed(t *testing.T) {
	testutil.NeedQemu(t)
	for _, f := range []string{"vmdk", "vhdx", "vdi", "vpc"} {
		t.Run(f, func(t *testing.T) {
			p := filepath.Join(t.TempDir(), "x."+f)
			testutil.Run(t, "qemu-img", "create", "-q", "-f", f, p, "4M")
			_, err := disk.Open(p, disk.OpenOptions{ReadOnly: true})
			if !errors.Is(err, disk.ErrUnsupported) || !strings.Contains(err.Error(), f) {
				t.Fatalf("open %s: %v", f, err)
			}
		})
	}
}

// TestHostileHeaders flips header fields to hostile values: each must give a
// clear error (never a panic, never a huge allocation).
func TestHostileHeaders(t *testing.T) {
	dir := t.TempDir()
	good := filepath.Join(dir, "good.qcow2")
	if err := disk.CreateFile(good, disk.CreateOptions{Size: 64 << 20}); err != nil {
		t.Fatal(err)
	}
	orig, _ := os.ReadFile(good)
	for _, tc := range []struct {
		name  string
		off   int
		bytes []byte
	}{
		{"cluster bits 40", 20, []byte{0, 0, 0, 40}},
		{"cluster bits 8", 20, []byte{0, 0, 0, 8}},
		{"huge l1 size", 36, []byte{0xff, 0xff, 0xff, 0xff}},
		{"l1 past end", 40, []byte{0, 0, 0, 1, 0, 0, 0, 0}},
		{"l1 unaligned", 40, []byte{0, 0, 0, 0, 0, 0, 0x10, 1}},
		{"refcount table past end", 48, []byte{0, 0, 0x10, 0, 0, 0, 0, 0}},
		{"refcount table huge", 56, []byte{0x7f, 0xff, 0xff, 0xff}},
		{"virtual size 2^62", 24, []byte{0x40, 0, 0, 0, 0, 0, 0, 0}},
		{"backing name past cluster", 8, []byte{0, 0, 0, 0, 0, 0, 0xff, 0xf0, 0, 0, 0x0f, 0xff}},
		{"unknown incompatible bit", 72, []byte{0, 0, 0, 0, 0, 0, 1, 0}},
		{"corrupt bit", 72, []byte{0, 0, 0, 0, 0, 0, 0, 2}},
		{"header length odd", 100, []byte{0, 0, 0, 105}},
		{"refcount order 7", 96, []byte{0, 0, 0, 7}},
		{"version 9", 4, []byte{0, 0, 0, 9}},
		{"encrypted", 32, []byte{0, 0, 0, 1}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := append([]byte(nil), orig...)
			copy(b[tc.off:], tc.bytes)
			p := filepath.Join(dir, "bad.qcow2")
			os.WriteFile(p, b, 0o644)
			img, err := disk.Open(p, disk.OpenOptions{ReadOnly: true})
			if err == nil {
				img.Close()
				t.Fatal("opened a hostile image")
			}
			if !errors.Is(err, disk.ErrCorrupt) && !errors.Is(err, disk.ErrUnsupported) {
				t.Fatalf("error is neither ErrCorrupt nor ErrUnsupported: %v", err)
			}
		})
	}
}

// FuzzOpen feeds arbitrary bytes to the parser, then reads, maps and checks
// whatever opens. Nothing may panic.
func FuzzOpen(f *testing.F) {
	dir := f.TempDir()
	for i, opts := range []disk.CreateOptions{
		{Size: 1 << 20, ClusterSize: 512},
		{Size: 4 << 20, ClusterSize: 1024},
		{Size: 8 << 20, ClusterSize: 4096, Compression: "zstd"},
	} {
		p := filepath.Join(dir, "seed"+strconv.Itoa(i)+".qcow2")
		if err := disk.CreateFile(p, opts); err != nil {
			f.Fatal(err)
		}
		img, err := disk.Open(p, disk.OpenOptions{})
		if err != nil {
			f.Fatal(err)
		}
		img.WriteAt([]byte("seed data for the fuzzer"), 1000)
		img.WriteZeroes(64<<10, 64<<10)
		img.Close()
		b, _ := os.ReadFile(p)
		if len(b) <= 64<<10 {
			f.Add(b)
		}
	}
	seeds, _ := filepath.Glob("testdata/*.qcow2")
	for _, s := range seeds {
		if b, err := os.ReadFile(s); err == nil && len(b) <= 64<<10 {
			f.Add(b)
		}
	}
	// One file per fuzzing process, rewritten for each input (its executions
	// run one after another), in memory when /dev/shm is there: a directory
	// per input on a disk would cost more than the parse.
	in := dir
	if d, err := os.MkdirTemp("/dev/shm", "cvd-fuzz-"); err == nil {
		in = d
		f.Cleanup(func() { os.RemoveAll(d) })
	}
	p := filepath.Join(in, "input.qcow2")
	f.Fuzz(func(t *testing.T, data []byte) {
		if err := os.WriteFile(p, data, 0o644); err != nil {
			t.Fatal(err)
		}
		img, err := disk.Open(p, disk.OpenOptions{ReadOnly: true, Format: disk.FormatQcow2})
		if err != nil {
			return
		}
		defer img.Close()
		size := img.Size()
		buf := make([]byte, 4096)
		for _, off := range []int64{0, size / 3, size - 1, size / 2} {
			if off >= 0 && off < size {
				img.ReadAt(buf, off)
			}
		}
		img.MapLayer(0, size)
		disk.Check(p, false)
	})
}

// TestCrashConsistency kills a child process that writes with copy-on-write at
// random moments: afterwards QEMU may find leaks but never corruption, and
// cvd's repair leaves a clean image that still opens and reads.
func TestCrashConsistency(t *testing.T) {
	if path := os.Getenv("CVD_CRASH_CHILD"); path != "" {
		crashChild(path)
		return
	}
	testutil.NeedQemu(t)
	rng := seededRand(t)
	rounds := 12
	if testing.Short() {
		rounds = 4
	}
	dir := t.TempDir()
	base := filepath.Join(dir, "base.qcow2")
	testutil.Run(t, "qemu-img", "create", "-q", "-f", "qcow2", base, "32M")
	qemuIO(t, base, "write -P 0x42 0 16M")
	for i := 0; i < rounds; i++ {
		top := filepath.Join(dir, "top"+strconv.Itoa(i)+".qcow2")
		cs := []int{512, 4096, 65536}[i%3]
		if err := disk.CreateFile(top, disk.CreateOptions{BackingFile: base, ClusterSize: cs}); err != nil {
			t.Fatal(err)
		}
		cmd := exec.Command(os.Args[0], "-test.run=^TestCrashConsistency$")
		cmd.Env = append(os.Environ(), "CVD_CRASH_CHILD="+top)
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		time.Sleep(time.Duration(20+rng.Intn(300)) * time.Millisecond)
		cmd.Process.Signal(syscall.SIGKILL)
		cmd.Wait()
		out, err := testutil.RunErr("qemu-img", "check", top)
		var ee *exec.ExitError
		if err != nil && !(errors.As(err, &ee) && ee.ExitCode() == 3) {
			t.Fatalf("round %d (cluster %d): qemu-img check after SIGKILL: %v\n%s", i, cs, err, out)
		}
		r, err := disk.Check(top, true)
		if err != nil || r.Corruptions != 0 {
			t.Fatalf("round %d: cvd check --repair: %+v %v", i, r, err)
		}
		testutil.QemuCheck(t, top)
		t.Logf("round %d: cluster %d, leaks repaired %d", i, cs, r.LeaksFixed)
	}
}

func crashChild(path string) {
	img, err := disk.Open(path, disk.OpenOptions{})
	if err != nil {
		os.Exit(2)
	}
	rng := rand.New(rand.NewSource(time.Now().UnixNano()))
	size := img.Size()
	for {
		off := rng.Int63n(size)
		n := min(rng.Int63n(256<<10)+1, size-off)
		switch rng.Intn(4) {
		case 0:
			img.Discard(off, n)
		default:
			b := make([]byte, n)
			rng.Read(b)
			if _, err := img.WriteAt(b, off); err != nil {
				os.Exit(3)
			}
		}
	}
}
