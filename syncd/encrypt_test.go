package syncd

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/cvd-project/cvd/disk"
	"github.com/cvd-project/cvd/internal/testutil"
	"github.com/cvd-project/cvd/syncd/laptop"
	"github.com/cvd-project/cvd/syncd/proto"
)

// encPattern is what the "guest" writes on the laptop: no laptop file may hold it.
var encPattern = bytes.Repeat([]byte("CVD-GUEST-PLAINTEXT-7f3a "), 41) // 1025 bytes

// laptopFiles lists the qcow2 files under a laptop's store.
func laptopFiles(t testing.TB, dir string) []string {
	t.Helper()
	var out []string
	filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err == nil && !d.IsDir() && strings.HasSuffix(p, ".qcow2") {
			out = append(out, p)
		}
		return nil
	})
	return out
}

// grepFiles fails if any regular file under dir holds pat.
func grepFiles(t testing.TB, dir string, pat []byte) {
	t.Helper()
	filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() || !d.Type().IsRegular() {
			return nil
		}
		b, err := os.ReadFile(p)
		if err == nil && bytes.Contains(b, pat) {
			t.Errorf("%s holds the plaintext the guest wrote", p)
		}
		return nil
	})
}

// guestWrite writes the pattern at many places of the laptop's system top,
// through the process's keyring (as any cvd command on the laptop does).
func guestWrite(t testing.TB, lap *testLaptop, desktop string) {
	t.Helper()
	img, err := disk.Open(lap.top(desktop, proto.DiskSystem), disk.OpenOptions{AllowedRoots: []string{lap.dir}})
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	for i := int64(0); i < 512; i++ {
		if _, err := img.WriteAt(encPattern, i*256*KiB+i*7); err != nil {
			t.Fatal(err)
		}
	}
	if err := img.Flush(); err != nil {
		t.Fatal(err)
	}
}

// chainDepth is how many layers the chain at top has.
func chainDepth(t testing.TB, top string, root string) int {
	t.Helper()
	img, err := disk.Open(top, disk.OpenOptions{ReadOnly: true, AllowedRoots: []string{root}})
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	return len(disk.Layers(img))
}

// An encrypted check-out and check-in on loopback: every laptop layer is LUKS,
// the guest's plaintext is in no laptop file, the check-in moves the bytes an
// unencrypted one moves, and the server's head reads as the laptop's chain.
func TestEncryptedCopy(t *testing.T) {
	ctx := context.Background()
	plainW := newWorld(t, smallSpec())
	encW := newWorld(t, smallSpec())

	plain := newLaptop(t, "plain")
	if _, err := plain.lp.CheckOut(ctx, plainW.client(plainW.token), plainW.desktop, laptop.CheckoutOptions{}); err != nil {
		t.Fatal(err)
	}
	enc := newLaptop(t, "enc")
	co, err := enc.lp.CheckOut(ctx, encW.client(encW.token), encW.desktop, laptop.CheckoutOptions{Encrypt: true})
	if err != nil {
		t.Fatal(err)
	}
	kek, err := encW.srv.EscrowedKey("laptop1", encW.desktop)
	if err != nil {
		t.Fatal(err)
	}
	if len(co.LayersFetched) == 0 {
		t.Fatal("nothing fetched")
	}
	files := laptopFiles(t, enc.dir)
	for _, p := range files {
		var info struct {
			Encrypted bool `json:"encrypted"`
		}
		if err := json.Unmarshal([]byte(testutil.Run(t, "qemu-img", "info", "--output=json", p)), &info); err != nil {
			t.Fatal(err)
		}
		if !info.Encrypted {
			t.Errorf("qemu-img info %s: not encrypted", p)
		}
	}
	t.Logf("%d laptop files, all encrypted", len(files))

	guestWrite(t, plain, plainW.desktop)
	guestWrite(t, enc, encW.desktop)
	grepFiles(t, enc.dir, encPattern[:64])

	cp, err := plain.lp.CheckIn(ctx, plainW.desktop, laptop.CheckinOptions{})
	if err != nil {
		t.Fatal(err)
	}
	ce, err := enc.lp.CheckIn(ctx, encW.desktop, laptop.CheckinOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("check-in: plain %d clusters, %d payload bytes, %d metadata; encrypted %d clusters, %d payload bytes, %d metadata",
		cp.Sent, cp.Payload, cp.Metadata, ce.Sent, ce.Payload, ce.Metadata)
	if ce.Sent != cp.Sent || ce.Payload != cp.Payload || ce.Changed != cp.Changed {
		t.Errorf("the encrypted copy's check-in moved %d clusters (%d bytes), the plain one %d (%d bytes)", ce.Sent, ce.Payload, cp.Sent, cp.Payload)
	}
	grepFiles(t, enc.dir, encPattern[:64])
	for _, p := range laptopFiles(t, enc.dir) {
		keys := make([]string, chainDepth(t, p, enc.dir))
		for i := range keys {
			keys[i] = kek
		}
		testutil.QemuCheckLUKS(t, p, keys...)
	}

	// The server's head reads as the laptop's chain, through QEMU with the key.
	_, head := encW.head()
	top := enc.top(encW.desktop, proto.DiskSystem)
	keys := make([]string, chainDepth(t, top, enc.dir))
	for i := range keys {
		keys[i] = kek
	}
	objs, spec := testutil.LUKSImageOpts(top, keys...)
	args := append(append([]string{"compare"}, objs...), "--image-opts", spec, "driver=qcow2,file.filename="+encW.store.LayerPath(head.System))
	if out, err := testutil.RunErr("qemu-img", args...); err != nil {
		t.Fatalf("qemu-img compare of the server's head and the laptop's encrypted chain: %v\n%s", err, out)
	}

	// A wrong key opens nothing.
	if _, err := disk.Open(top, disk.OpenOptions{ReadOnly: true, NoBacking: true, Keys: disk.Keys([]byte(strings.Repeat("0", 64)))}); !errors.Is(err, disk.ErrBadKey) {
		t.Fatalf("open with a wrong key: %v", err)
	}
}

// The copy's key dies with its lease: offline past the expiry the purge
// shreds the key and the LUKS key slots before it deletes the files (a file
// that survives opens with no key, not even the escrowed one), a clock turned
// back does not revive it; a wipe does the same at the next contact.
func TestEncryptedCopyExpiryAndWipe(t *testing.T) {
	ctx := context.Background()
	w := newWorld(t, smallSpec())
	lap := newLaptop(t, "lap")
	if _, err := lap.lp.CheckOut(ctx, w.client(w.token), w.desktop, laptop.CheckoutOptions{Encrypt: true, TTL: 3 * time.Second}); err != nil {
		t.Fatal(err)
	}
	kek, err := w.srv.EscrowedKey("laptop1", w.desktop)
	if err != nil {
		t.Fatal(err)
	}
	// Keep a second name of every file: the purge's deletion does not reach
	// them, its shred does (it overwrites the key slots in place).
	keep := filepath.Join(lap.dir, "..", "kept")
	if err := os.MkdirAll(keep, 0o755); err != nil {
		t.Fatal(err)
	}
	var kept []string
	for i, p := range laptopFiles(t, lap.dir) {
		k := filepath.Join(keep, filepath.Base(p)+"."+string(rune('a'+i))+".qcow2")
		if err := os.Link(p, k); err != nil {
			t.Fatal(err)
		}
		kept = append(kept, k)
	}
	// The key opens them while the lease holds.
	for _, k := range kept {
		img, err := disk.Open(k, disk.OpenOptions{ReadOnly: true, NoBacking: true, Keys: disk.Keys([]byte(kek))})
		if err != nil {
			t.Fatalf("before the expiry: %v", err)
		}
		img.Close()
	}
	time.Sleep(3500 * time.Millisecond)
	// Offline: the purge every command runs first.
	rep, err := lap.lp.PurgeExpired(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(rep) != 1 {
		t.Fatalf("purged %d copies", len(rep))
	}
	if ents, _ := os.ReadDir(filepath.Join(lap.dir, "sync", "keys")); len(ents) != 0 {
		t.Fatalf("key files left after the purge: %v", ents)
	}
	for _, k := range kept {
		if _, err := disk.Open(k, disk.OpenOptions{ReadOnly: true, NoBacking: true, Keys: disk.Keys([]byte(kek))}); !errors.Is(err, disk.ErrBadKey) {
			t.Fatalf("a surviving file after the purge, with the escrowed key: %v, want ErrBadKey", err)
		}
	}
	if left := laptopFiles(t, lap.dir); len(left) != 0 {
		t.Errorf("files left in the store: %v", left)
	}

	// Check out again (another lease), then turn the clock back an hour
	// before the expiry: the lease still runs out on time.
	w.now = time.Now()
	if _, err := w.srv.BreakLease(w.desktop); err != nil && !errors.Is(err, proto.ErrNoLease) {
		t.Fatal(err)
	}
	if _, err := lap.lp.CheckOut(ctx, w.client(w.token), w.desktop, laptop.CheckoutOptions{Encrypt: true, TTL: 4 * time.Second}); err != nil {
		t.Fatal(err)
	}
	time.Sleep(1200 * time.Millisecond)
	if rep, err := lap.lp.PurgeExpired(ctx); err != nil || len(rep) != 0 {
		t.Fatalf("purge before the expiry: %v %v", rep, err)
	}
	lap.reopen(laptop.LaptopOptions{Now: func() time.Time { return time.Now().Add(-time.Hour) }})
	time.Sleep(4 * time.Second) // the mark seen at 1.2 s (persisted to the nanosecond) + 4 s is past the 4 s lease
	if rep, err := lap.lp.PurgeExpired(ctx); err != nil || len(rep) != 1 {
		t.Fatalf("with the clock an hour back, past the expiry, the purge removed %v (%v)", rep, err)
	}

	// A wipe at the next contact.
	lap.reopen(laptop.LaptopOptions{})
	w.now = time.Now()
	if _, err := w.srv.BreakLease(w.desktop); err != nil && !errors.Is(err, proto.ErrNoLease) {
		t.Fatal(err)
	}
	if _, err := lap.lp.CheckOut(ctx, w.client(w.token), w.desktop, laptop.CheckoutOptions{Encrypt: true}); err != nil {
		t.Fatal(err)
	}
	files := laptopFiles(t, lap.dir)
	if _, err := w.srv.WipeDevice("laptop1"); err != nil {
		t.Fatal(err)
	}
	if _, err := lap.lp.Renew(ctx, w.desktop, 0); !errors.Is(err, proto.ErrWiped) {
		t.Fatalf("renew after a wipe: %v, want ErrWiped", err)
	}
	if cos, _ := lap.lp.Checkouts(); len(cos) != 0 {
		t.Fatalf("%d copies left after the wipe", len(cos))
	}
	if left := laptopFiles(t, lap.dir); len(left) != 0 {
		t.Errorf("files left after the wipe: %v (had %d)", left, len(files))
	}
	if ents, _ := os.ReadDir(filepath.Join(lap.dir, "sync", "keys")); len(ents) != 0 {
		t.Fatalf("key files left after the wipe: %v", ents)
	}
	// The wiped device's token is refused from now on.
	if _, err := w.client(w.token).Manifest(ctx, w.desktop); !errors.Is(err, proto.ErrWiped) {
		t.Fatalf("a wiped device's request: %v", err)
	}
}
