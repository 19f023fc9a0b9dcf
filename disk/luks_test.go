package disk_test

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/cvd-project/cvd/disk"
	"github.com/cvd-project/cvd/internal/testutil"
)

// Keys are what cvd hands QEMU: ASCII passphrases.
const (
	lkBase = "base-5e1f0c2a9d7b43e8a1c6f0b2d4e8a7c1"
	lkTop  = "top-0f3a2c7e9b1d45a6b8c0e2f4a6b8c0d2"
)

// lkQemuIO runs qemu-io commands on an encrypted qcow2 chain.
func lkQemuIO(t testing.TB, path string, keys []string, cmds []string) {
	t.Helper()
	objs, spec := testutil.LUKSImageOpts(path, keys...)
	for len(cmds) > 0 {
		n := min(len(cmds), 200)
		args := append([]string{}, objs...)
		for _, c := range cmds[:n] {
			args = append(args, "-c", c)
		}
		testutil.Run(t, "qemu-io", append(args, "--image-opts", spec)...)
		cmds = cmds[n:]
	}
}

// lkQemuRaw is the guest view of an encrypted chain as QEMU reads it.
func lkQemuRaw(t testing.TB, path string, keys ...string) []byte {
	t.Helper()
	objs, spec := testutil.LUKSImageOpts(path, keys...)
	out := filepath.Join(t.TempDir(), "qemu.raw")
	testutil.Run(t, "qemu-img", append(append([]string{"convert"}, objs...), "--image-opts", spec, "-O", "raw", out)...)
	b, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// lkQemuCompare runs qemu-img compare of the encrypted chain and a raw file.
func lkQemuCompare(t testing.TB, path, raw string, keys ...string) bool {
	t.Helper()
	objs, spec := testutil.LUKSImageOpts(path, keys...)
	return testutil.QemuCompare(t, spec, "driver=raw,file.filename="+raw, append(objs, "--image-opts")...)
}

func lkQemuCreate(t testing.TB, path string, cs, size int64, key string, backing ...string) {
	t.Helper()
	args := []string{"create", "-q", "-f", "qcow2", "--object", "secret,id=k,data=" + key,
		"-o", fmt.Sprintf("encrypt.format=luks,encrypt.key-secret=k,encrypt.iter-time=100,cluster_size=%d", cs)}
	if len(backing) > 0 {
		args = append(args, "-b", backing[0], "-F", "qcow2", "-u")
	}
	args = append(args, path, strconv.FormatInt(size, 10))
	// QEMU calibrates PBKDF2 by the thread's CPU time, and gives up with
	// "Unable to get accurate CPU usage" when a busy machine starves it: retry.
	for try := 0; ; try++ {
		out, err := testutil.RunErr("qemu-img", args...)
		if err == nil {
			return
		}
		if try == 10 || !strings.Contains(out, "accurate CPU usage") {
			t.Fatalf("qemu-img %s: %v (try %d)\n%s", strings.Join(args, " "), err, try+1, out)
		}
		os.Remove(path)
		time.Sleep(time.Duration(try+1) * 300 * time.Millisecond)
	}
}

func lkCheck(t testing.TB, img string) {
	t.Helper()
	r, err := disk.Check(img, false)
	if err != nil {
		t.Fatalf("disk.Check %s: %v", img, err)
	}
	if r.Corruptions+r.Leaks+r.CheckErrors != 0 {
		t.Fatalf("disk.Check %s: %+v", img, r)
	}
}

// The random-write differential test on encrypted layers: cvd writes an
// encrypted top over a QEMU-encrypted base (another key) and QEMU must read
// exactly the model; then QEMU writes into cvd's file and cvd must read what
// QEMU reads.
func TestLUKSDifferential(t *testing.T) {
	testutil.NeedQemu(t)
	tests := []struct {
		name string
		cs   int64
		size int64
		ops  int
	}{
		{"4K", 4 * qdKiB, 16 * qdMiB, 1500},
		{"64K", 64 * qdKiB, 32 * qdMiB, 800},
		{"2M", 2 * qdMiB, 64 * qdMiB, 400},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			rng := qdRand(t)
			dir := qdTempDir(t)
			base := filepath.Join(dir, "base.qcow2")
			top := filepath.Join(dir, "top.qcow2")
			lkQemuCreate(t, base, 64*qdKiB, tc.size-3*qdMiB, lkBase)
			baseOps := qdGenQemuOps(rng, tc.size-3*qdMiB, 64*qdKiB, 200, nil, true)
			lkQemuIO(t, base, []string{lkBase}, qdQemuCmds(baseOps))
			model := make([]byte, tc.size)
			copy(model, lkQemuRaw(t, base, lkBase))

			keys := disk.KeyMap(map[string][]byte{base: []byte(lkBase)})
			img, err := disk.Create(top, disk.CreateOptions{ClusterSize: int(tc.cs), Size: tc.size, BackingFile: base,
				BackingFormat: disk.FormatQcow2, Encrypt: &disk.Encryption{Key: []byte(lkTop)}, Keys: keys})
			if err != nil {
				t.Fatalf("disk.Create: %v", err)
			}
			if in := img.Info(); !in.Encrypted || !in.Unlocked {
				t.Fatalf("new image: encrypted %v unlocked %v", in.Encrypted, in.Unlocked)
			}
			var touched [][2]int64
			for _, o := range qdGenCvdOps(rng, tc.size, tc.cs, tc.ops, nil, nil) {
				touched = append(touched, qdApply(t, img, model, rng, o))
			}
			if err := img.Close(); err != nil {
				t.Fatal(err)
			}
			// Reopen: in-place rewrites of what was written, unaligned ones too.
			both := disk.KeyMap(map[string][]byte{base: []byte(lkBase), top: []byte(lkTop)})
			img, err = disk.Open(top, disk.OpenOptions{Keys: both})
			if err != nil {
				t.Fatalf("reopen: %v", err)
			}
			for _, o := range qdGenCvdOps(rng, tc.size, tc.cs, tc.ops/2, touched, nil) {
				qdApply(t, img, model, rng, o)
			}
			marker := bytes.Repeat([]byte("PLAINTEXT-MARKER-cvd-luks!"), 2600)
			mOff := tc.size/2 + 777
			if _, err := img.WriteAt(marker, mOff); err != nil {
				t.Fatal(err)
			}
			copy(model[mOff:], marker)
			if err := img.Close(); err != nil {
				t.Fatal(err)
			}

			testutil.QemuCheckLUKS(t, top, lkTop, lkBase)
			testutil.QemuCheckLUKS(t, base, lkBase)
			lkCheck(t, top)
			modelPath := filepath.Join(dir, "model.raw")
			if err := os.WriteFile(modelPath, model, 0o644); err != nil {
				t.Fatal(err)
			}
			if !lkQemuCompare(t, top, modelPath, lkTop, lkBase) {
				t.Fatal("qemu-img compare: cvd's encrypted chain differs from the model")
			}
			raw, err := os.ReadFile(top)
			if err != nil {
				t.Fatal(err)
			}
			if bytes.Contains(raw, []byte("PLAINTEXT-MARKER")) {
				t.Fatal("the plaintext the guest wrote is in the encrypted file")
			}
			info := testutil.Run(t, "qemu-img", "info", top)
			if !strings.Contains(info, "encrypted: yes") || !strings.Contains(info, "format: luks") {
				t.Fatalf("qemu-img info does not see a LUKS image:\n%s", info)
			}

			// QEMU writes into cvd's encrypted file; cvd reads what QEMU reads.
			qemuOps := qdGenQemuOps(rng, tc.size, tc.cs, 300, nil, false)
			lkQemuIO(t, top, []string{lkTop, lkBase}, qdQemuCmds(qemuOps))
			want := lkQemuRaw(t, top, lkTop, lkBase)
			ro, err := disk.Open(top, disk.OpenOptions{ReadOnly: true, Keys: both})
			if err != nil {
				t.Fatal(err)
			}
			defer ro.Close()
			got := make([]byte, tc.size)
			if _, err := ro.ReadAt(got, 0); err != nil && !errors.Is(err, io.EOF) {
				t.Fatal(err)
			}
			if i := qdFirstDiff(got, want); i >= 0 {
				t.Fatalf("after QEMU's writes, cvd reads byte %d as %#x, QEMU as %#x", i, got[i], want[i])
			}
		})
	}
}

// Images QEMU encrypts (its own layout, its PBKDF2 calibration) read the same in
// cvd, and cvd writes into them.
func TestLUKSReadsQemuImages(t *testing.T) {
	testutil.NeedQemu(t)
	for _, cs := range []int64{512, 64 * qdKiB, 2 * qdMiB} {
		t.Run(strconv.FormatInt(cs, 10), func(t *testing.T) {
			t.Parallel()
			rng := qdRand(t)
			dir := qdTempDir(t)
			const size = 24 * qdMiB
			p := filepath.Join(dir, "q.qcow2")
			lkQemuCreate(t, p, cs, size, lkTop)
			lkQemuIO(t, p, []string{lkTop}, qdQemuCmds(qdGenQemuOps(rng, size, cs, 300, nil, false)))
			want := lkQemuRaw(t, p, lkTop)
			img, err := disk.Open(p, disk.OpenOptions{Keys: disk.KeyMap(map[string][]byte{p: []byte(lkTop)})})
			if err != nil {
				t.Fatal(err)
			}
			got := make([]byte, size)
			if _, err := img.ReadAt(got, 0); err != nil && !errors.Is(err, io.EOF) {
				t.Fatal(err)
			}
			if i := qdFirstDiff(got, want); i >= 0 {
				t.Fatalf("cvd reads byte %d of QEMU's image as %#x, QEMU as %#x", i, got[i], want[i])
			}
			for _, o := range qdGenCvdOps(rng, size, cs, 300, nil, nil) {
				qdApply(t, img, want, rng, o)
			}
			if err := img.Close(); err != nil {
				t.Fatal(err)
			}
			testutil.QemuCheckLUKS(t, p, lkTop)
			if got := lkQemuRaw(t, p, lkTop); !bytes.Equal(got, want) {
				t.Fatalf("QEMU reads cvd's writes into its image differently at byte %d", qdFirstDiff(got, want))
			}
		})
	}
}

// Keys: a wrong one is refused, none opens the layer locked, a shred makes the
// right one useless to cvd and to QEMU.
func TestLUKSKeys(t *testing.T) {
	testutil.NeedQemu(t)
	dir := t.TempDir()
	p := filepath.Join(dir, "e.qcow2")
	img, err := disk.Create(p, disk.CreateOptions{Size: 8 * qdMiB, Encrypt: &disk.Encryption{Key: []byte(lkTop)}})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := img.WriteAt(bytes.Repeat([]byte{0xab}, 1<<20), 1<<20); err != nil {
		t.Fatal(err)
	}
	img.Close()

	_, err = disk.Open(p, disk.OpenOptions{Keys: disk.KeyMap(map[string][]byte{p: []byte("wrong")})})
	if !errors.Is(err, disk.ErrBadKey) {
		t.Fatalf("open with a wrong key: %v, want ErrBadKey", err)
	}
	locked, err := disk.Open(p, disk.OpenOptions{})
	if err != nil {
		t.Fatalf("open without a key: %v", err)
	}
	if in := locked.Info(); !in.Encrypted || in.Unlocked {
		t.Fatalf("locked image: encrypted %v unlocked %v", in.Encrypted, in.Unlocked)
	}
	if _, err := locked.ReadAt(make([]byte, 4096), 1<<20); !errors.Is(err, disk.ErrKeyRequired) {
		t.Fatalf("read of a locked layer's data: %v, want ErrKeyRequired", err)
	}
	if _, err := locked.ReadAt(make([]byte, 4096), 4<<20); err != nil {
		t.Fatalf("read of an unallocated range of a locked layer: %v", err)
	}
	if _, err := locked.WriteAt(make([]byte, 4096), 0); !errors.Is(err, disk.ErrKeyRequired) {
		t.Fatalf("write to a locked layer: %v, want ErrKeyRequired", err)
	}
	if ext, err := locked.MapLayer(0, 8*qdMiB); err != nil || len(ext) == 0 {
		t.Fatalf("MapLayer of a locked layer: %v %v", ext, err)
	}
	locked.Close()
	lkCheck(t, p)
	testutil.QemuCheckLUKS(t, p, lkTop)

	if err := disk.ShredKeys(p); err != nil {
		t.Fatal(err)
	}
	_, err = disk.Open(p, disk.OpenOptions{Keys: disk.KeyMap(map[string][]byte{p: []byte(lkTop)})})
	if !errors.Is(err, disk.ErrBadKey) {
		t.Fatalf("open with the right key after a shred: %v, want ErrBadKey", err)
	}
	objs, spec := testutil.LUKSImageOpts(p, lkTop)
	out, err := testutil.RunErr("qemu-img", append(append([]string{"convert"}, objs...), "--image-opts", spec, "-O", "raw", filepath.Join(dir, "x.raw"))...)
	if err == nil || !strings.Contains(out, "Invalid password") {
		t.Fatalf("QEMU after a shred: %v\n%s", err, out)
	}
	lkCheck(t, p) // the file is still a sound qcow2
	if err := disk.ShredKeys(filepath.Join(dir, "missing")); err == nil {
		t.Fatal("shred of a missing file succeeded")
	}
	plain := filepath.Join(dir, "plain.qcow2")
	testutil.Run(t, "qemu-img", "create", "-q", "-f", "qcow2", plain, "1M")
	if err := disk.ShredKeys(plain); !errors.Is(err, disk.ErrNotEncrypted) {
		t.Fatalf("shred of a plain image: %v", err)
	}
}

// Hostile encrypted images get ErrCorrupt or ErrUnsupported, quickly, before any
// key work a header could make unbounded.
func TestLUKSHostile(t *testing.T) {
	dir := t.TempDir()
	src := filepath.Join(dir, "src.qcow2")
	img, err := disk.Create(src, disk.CreateOptions{Size: 4 * qdMiB, Encrypt: &disk.Encryption{Key: []byte(lkTop)}})
	if err != nil {
		t.Fatal(err)
	}
	img.Close()
	good, err := os.ReadFile(src)
	if err != nil {
		t.Fatal(err)
	}
	luks := bytes.Index(good, []byte("LUKS\xba\xbe"))
	if luks <= 0 {
		t.Fatal("no LUKS header in the file")
	}
	ext := bytes.Index(good[:4096], []byte{0x05, 0x37, 0xbe, 0x77})
	be := func(b []byte, off int, v uint64, n int) {
		for i := n - 1; i >= 0; i-- {
			b[off+i] = byte(v)
			v >>= 8
		}
	}
	tests := []struct {
		name  string
		patch func(b []byte)
		want  error
	}{
		{"legacy AES crypt_method", func(b []byte) { be(b, 32, 1, 4) }, disk.ErrUnsupported},
		{"unknown crypt_method", func(b []byte) { be(b, 32, 7, 4) }, disk.ErrCorrupt},
		{"LUKS without the extension", func(b []byte) { be(b, ext, 0x12345678, 4) }, disk.ErrCorrupt},
		{"LUKS header past the end", func(b []byte) { be(b, ext+8, 1<<40, 8) }, disk.ErrCorrupt},
		{"LUKS header length huge", func(b []byte) { be(b, ext+16, 1<<40, 8) }, disk.ErrCorrupt},
		{"no LUKS magic", func(b []byte) { b[luks] = 'X' }, disk.ErrCorrupt},
		{"LUKS2", func(b []byte) { be(b, luks+6, 2, 2) }, disk.ErrUnsupported},
		{"cipher serpent", func(b []byte) { copy(b[luks+8:], "serpent\x00") }, disk.ErrUnsupported},
		{"digest iterations huge", func(b []byte) { be(b, luks+164, 1<<31, 4) }, disk.ErrCorrupt},
		{"slot iterations huge", func(b []byte) { be(b, luks+208+4, 1<<31, 4) }, disk.ErrCorrupt},
		{"slot key material outside", func(b []byte) { be(b, luks+208+40, 1<<30, 4) }, disk.ErrCorrupt},
		{"slot stripes huge", func(b []byte) { be(b, luks+208+44, 1<<30, 4) }, disk.ErrCorrupt},
		{"key bytes odd", func(b []byte) { be(b, luks+108, 17, 4) }, disk.ErrCorrupt},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			b := bytes.Clone(good)
			tc.patch(b)
			p := filepath.Join(t.TempDir(), "h.qcow2")
			if err := os.WriteFile(p, b, 0o644); err != nil {
				t.Fatal(err)
			}
			img, err := disk.Open(p, disk.OpenOptions{ReadOnly: true, Keys: disk.Keys([]byte(lkTop))})
			if err == nil {
				img.Close()
				t.Fatal("opened a hostile image")
			}
			if !errors.Is(err, tc.want) {
				t.Fatalf("error %v, want %v", err, tc.want)
			}
		})
	}
}
