package syncd

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"testing"
	"time"

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
