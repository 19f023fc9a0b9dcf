package syncd

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/cvd-project/cvd/images"
	"github.com/cvd-project/cvd/syncd/laptop"

	"github.com/cvd-project/cvd/disk"
	"github.com/cvd-project/cvd/internal/testutil"
	"github.com/cvd-project/cvd/syncd/proto"
)

// holdOpen keeps path open in qemu-io (QEMU's image locks, as a running VM holds
// them) until the returned function is called.
func holdOpen(t *testing.T, path string) func() {
	t.Helper()
	q := exec.Command("qemu-io", "-f", "qcow2", path)
	stdin, err := q.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	q.Stdout = io.Discard
	if err := q.Start(); err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		if busy, _ := disk.InUse(path); busy {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("qemu-io did not lock %s", path)
		}
	}
	done := false
	release := func() {
		if !done {
			done = true
			stdin.Close()
			q.Wait()
		}
	}
	t.Cleanup(release)
	return release
}

// TestCheckinRefusesTopInUse: a laptop top that QEMU holds open is not checked in
// (whatever libvirt says: this laptop has no libvirt hook), nothing changes on
// either side, and once QEMU lets go the check-in lands.
func TestCheckinRefusesTopInUse(t *testing.T) {
	ctx := context.Background()
	w := newWorld(t, smallSpec())
	lap := newLaptop(t, "laptop")
	if _, err := lap.lp.CheckOut(ctx, w.client(w.token), w.desktop, laptop.CheckoutOptions{}); err != nil {
		t.Fatal(err)
	}
	writeTop(t, lap, w.desktop, proto.DiskSystem, []write{{off: 0, data: testutil.Fill(3, 2*MiB, false)}})
	before, _ := w.head()
	top := lap.top(w.desktop, proto.DiskSystem)
	sum := sumOf(t, top)
	release := holdOpen(t, top)
	_, err := lap.lp.CheckIn(ctx, w.desktop, laptop.CheckinOptions{})
	if !errors.Is(err, proto.ErrInUse) {
		t.Fatalf("check-in of a top QEMU holds: %v, want ErrInUse", err)
	}
	if after, _ := w.head(); after != before {
		t.Errorf("the server's head moved to %d", after)
	}
	if sumOf(t, top) != sum || lap.top(w.desktop, proto.DiskSystem) != top {
		t.Error("the laptop's top changed")
	}
	release()
	rep, err := lap.lp.CheckIn(ctx, w.desktop, laptop.CheckinOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if after, _ := w.head(); after != before+1 || rep.Version != after {
		t.Errorf("after QEMU let go: head %d, report %+v", after, rep)
	}
}

// TestCheckoutRefusesServerTopInUse: a check-out whose server-side top is open in
// QEMU (a VM libvirt did not stop) is refused; no lease, no version.
func TestCheckoutRefusesServerTopInUse(t *testing.T) {
	ctx := context.Background()
	w := newWorld(t, smallSpec())
	d, err := w.store.Desktop(w.desktop)
	if err != nil {
		t.Fatal(err)
	}
	before, _ := w.head()
	release := holdOpen(t, w.store.Path(d.SystemDisk))
	lap := newLaptop(t, "laptop")
	_, err = lap.lp.CheckOut(ctx, w.client(w.token), w.desktop, laptop.CheckoutOptions{})
	if !errors.Is(err, proto.ErrInUse) {
		t.Fatalf("check-out while the server's top is open in QEMU: %v, want ErrInUse", err)
	}
	st, err := w.srv.DesktopStatus(w.desktop)
	if err != nil {
		t.Fatal(err)
	}
	if st.Lease != nil || st.Head != before {
		t.Errorf("after the refusal: lease %+v, head %d (was %d)", st.Lease, st.Head, before)
	}
	release()
	if _, err := lap.lp.CheckOut(ctx, w.client(w.token), w.desktop, laptop.CheckoutOptions{}); err != nil {
		t.Fatal(err)
	}
}

// sumOf is the SHA-256 of a file's bytes.
func sumOf(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return fmt.Sprintf("%x", sha256.Sum256(b))
}

// TestGCKeepsStagingParents: a check-in still receiving keeps its parent layer
// (and the parent's ancestors) from the store's garbage collection, though no
// version stands on it any more; once the check-in is gone, gc removes it.
func TestGCKeepsStagingParents(t *testing.T) {
	w := newWorld(t, worldSpec{baseSize: 64 * MiB, baseWrites: []write{{off: 0, data: testutil.Fill(1, MiB, false)}}})
	src := filepath.Join(t.TempDir(), "loose.qcow2")
	makeImage(t, src, 64*MiB, "", []write{{off: 0, data: testutil.Fill(2, MiB, false)}})
	loose, _, err := w.store.Import(context.Background(), src, images.ImportOptions{})
	if err != nil {
		t.Fatal(err)
	}
	id := strings.Repeat("ab", 16)
	se := &Session{CheckinRequest: proto.CheckinRequest{ID: id, Desktop: w.desktop, Base: 1,
		Disks: []proto.CheckinDisk{{Name: proto.DiskSystem, Parent: loose.ID, Size: 64 * MiB, ClusterSize: 65536}}},
		Device: w.device.ID, State: proto.SessionReceiving, Created: w.now}
	if err := w.srv.putSession(se); err != nil {
		t.Fatal(err)
	}
	rep, err := w.store.GC(context.Background(), false)
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range rep.Removed {
		if l.ID == loose.ID {
			t.Fatal("gc removed the parent of a check-in still receiving")
		}
	}
	w.now = w.now.Add(25 * time.Hour)
	if n, err := w.srv.reapSessions(); err != nil || n != 1 {
		t.Fatalf("reap: %d, %v", n, err)
	}
	rep, err = w.store.GC(context.Background(), false)
	if err != nil {
		t.Fatal(err)
	}
	if len(rep.Removed) != 1 || rep.Removed[0].ID != loose.ID {
		t.Fatalf("gc after the check-in was reaped removed %+v, want the loose layer", rep.Removed)
	}
}

// TestReapOnceAcrossSite: while another process of the site holds the reaper's
// lock (it is reaping), this server skips its turn; a check-in another process
// is working on (its lock held) is never reaped; both are reaped once free.
func TestReapOnceAcrossSite(t *testing.T) {
	w := newWorld(t, worldSpec{baseSize: 64 * MiB, baseWrites: []write{{off: 0, data: testutil.Fill(1, MiB, false)}}})
	peer, err := images.Open(w.dir, images.OpenOptions{}) // another server's handle on the catalog
	if err != nil {
		t.Fatal(err)
	}
	defer peer.Close()
	_, v := w.head()
	ids := []string{strings.Repeat("c1", 16), strings.Repeat("c2", 16)}
	for _, id := range ids {
		se := &Session{CheckinRequest: proto.CheckinRequest{ID: id, Desktop: w.desktop, Base: v.N,
			Disks: []proto.CheckinDisk{{Name: proto.DiskSystem, Parent: v.System, Size: 64 * MiB, ClusterSize: 65536}}},
			Device: w.device.ID, State: proto.SessionReceiving, Created: w.now}
		if err := w.srv.putSession(se); err != nil {
			t.Fatal(err)
		}
	}
	w.now = w.now.Add(25 * time.Hour)
	reaping, err := peer.Catalog().TryLock("reap", false)
	if err != nil {
		t.Fatal(err)
	}
	if n, err := w.srv.reapSessions(); err != nil || n != 0 {
		t.Fatalf("reap while another server reaps: %d, %v; want 0 (its turn skipped)", n, err)
	}
	reaping()
	busy, err := peer.Catalog().TryLock("checkin/"+ids[0], false)
	if err != nil {
		t.Fatal(err)
	}
	if n, err := w.srv.reapSessions(); err != nil || n != 1 {
		t.Fatalf("reap with one check-in busy elsewhere: %d, %v; want 1", n, err)
	}
	busy()
	if n, err := w.srv.reapSessions(); err != nil || n != 1 {
		t.Fatalf("reap once free: %d, %v; want 1", n, err)
	}
}
