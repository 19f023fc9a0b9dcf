package syncd

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/cvd-project/cvd/desktop"
	"github.com/cvd-project/cvd/disk"
	"github.com/cvd-project/cvd/images"
	"github.com/cvd-project/cvd/internal/testutil"
	"github.com/cvd-project/cvd/syncd/laptop"
	"github.com/cvd-project/cvd/syncd/proto"
	"github.com/cvd-project/cvd/vm"
)

// readAt reads n bytes at off through a laptop's top of a disk.
func (l *testLaptop) readAt(desktop, dn string, off, n int64) []byte {
	l.t.Helper()
	img, err := disk.Open(l.top(desktop, dn), disk.OpenOptions{ReadOnly: true, AllowedRoots: []string{l.dir}})
	if err != nil {
		l.t.Fatal(err)
	}
	defer img.Close()
	b := make([]byte, n)
	if _, err := img.ReadAt(b, off); err != nil {
		l.t.Fatal(err)
	}
	return b
}

// writeAt writes ws into a laptop's top of a disk.
func (l *testLaptop) writeAt(desktop, dn string, ws []write) {
	l.t.Helper()
	img, err := disk.Open(l.top(desktop, dn), disk.OpenOptions{AllowedRoots: []string{l.dir}})
	if err != nil {
		l.t.Fatal(err)
	}
	defer img.Close()
	applyWrites(l.t, img, ws)
}

// TestDeviceGroup: one desktop, laptop A (full policy) and laptop B (apps
// policy, hardware class hw2, whose base variant is the common base with a
// driver layer). A is active and pushes a system and a user pattern; B,
// inactive, stages them without touching its running chain and applies them
// at its next start onto hw2's variant; B's system push is refused naming A,
// its user push moves the head and reaches A; B opens the desktop (snapshot
// first, A syncs up and steps down); A opens it back with B gone past the
// wait, and B's later check-in is a conflict version. Nothing is lost.
func TestDeviceGroup(t *testing.T) {
	ctx := context.Background()
	w := newWorld(t, worldSpec{
		baseSize:   64 * MiB,
		baseWrites: []write{{off: 0, data: testutil.Fill(1, 8*MiB, false)}},
		appWrites:  []write{{off: 16 * MiB, data: testutil.Fill(2, 4*MiB, false)}},
		userSize:   32 * MiB,
	})
	drvPattern := testutil.Fill(3, 2*MiB, false)
	src := t.TempDir()
	makeImage(t, filepath.Join(src, "drv.qcow2"), 0, w.store.LayerPath(w.base), []write{
		{off: 40 * MiB, data: drvPattern},
		{off: 18 * MiB, data: testutil.Fill(4, 64*KiB, false)}, // under the app: a conflict the app wins
	})
	drv, _, err := w.store.Import(ctx, filepath.Join(src, "drv.qcow2"), images.ImportOptions{Parent: w.base, Kind: images.KindApp, Names: []string{"drv:hw2"}})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := desktop.RegisterVariant(w.store, "hw2", drv.ID, ""); err != nil {
		t.Fatal(err)
	}
	_, tokB, err := w.srv.AddDevice("b", DeviceOptions{Desktops: []string{w.desktop}, Policy: proto.PolicyApps, Class: "hw2"})
	if err != nil {
		t.Fatal(err)
	}
	cA, cB := w.client(w.token), w.client(tokB)
	lapA, lapB := newLaptop(t, "a"), newLaptop(t, "b")
	// B was provisioned with its class's base: it holds the variant's chain.
	for _, id := range []string{w.base, drv.ID} {
		l, err := w.store.Layer(id)
		if err != nil {
			t.Fatal(err)
		}
		if _, _, err := lapB.store.Import(ctx, w.store.LayerPath(l.ID), images.ImportOptions{Parent: l.Parent, Kind: l.Kind}); err != nil {
			t.Fatal(err)
		}
	}

	// A opens the desktop: nobody is active, it checks out.
	if rep, err := lapA.lp.Open(ctx, cA, w.desktop, laptop.OpenOptions{}); err != nil || rep.Checkout == nil {
		t.Fatalf("A opens: %+v %v", rep, err)
	}
	// B follows: the head on hw2's variant; the common base is not sent again.
	fb, err := lapB.lp.Follow(ctx, cB, w.desktop, laptop.FollowOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if !fb.SetUp || fb.Policy != proto.PolicyApps || fb.Variant == nil || fb.Variant.Layer != drv.ID || fb.Variant.ConflictClusters != 1 {
		t.Fatalf("B follows: %+v (variant %+v)", fb, fb.Variant)
	}
	if slices.Contains(fb.LayersFetched, w.base) || slices.Contains(fb.LayersFetched, drv.ID) || slices.Contains(fb.LayersFetched, w.app) {
		t.Errorf("B fetched %v: the common base, the variant or the app as the desktop has it", fb.LayersFetched)
	}
	t.Logf("B set up under the apps policy: %d layers fetched (%d stream bytes), %d held, %d conflict cluster(s) with the driver layer",
		len(fb.LayersFetched), fb.Bytes, len(fb.LayersHeld), fb.Variant.ConflictClusters)
	if got := lapB.readAt(w.desktop, proto.DiskSystem, 40*MiB, 2*MiB); !bytes.Equal(got, drvPattern) {
		t.Fatal("B's system disk does not read its driver layer")
	}
	if got := lapB.readAt(w.desktop, proto.DiskSystem, 16*MiB, 4*MiB); !bytes.Equal(got, testutil.Fill(2, 4*MiB, false)) {
		t.Fatal("B's system disk does not read the app as the desktop has it (the app wins the conflict)")
	}

	// A installs an app on the system disk and writes a user file; it pushes.
	sysPattern, userPattern := testutil.Fill(5, 1*MiB, false), testutil.Fill(6, 1*MiB, false)
	lapA.writeAt(w.desktop, proto.DiskSystem, []write{{off: 48 * MiB, data: sysPattern}})
	lapA.writeAt(w.desktop, proto.DiskUser, []write{{off: 0, data: userPattern}})
	ciA, err := lapA.lp.CheckIn(ctx, w.desktop, laptop.CheckinOptions{})
	if err != nil || ciA.Conflict {
		t.Fatalf("A pushes: %+v %v", ciA, err)
	}

	// B, running, stages them: its tops stand where they stood.
	coB, _ := lapB.lp.Checkout(w.desktop)
	before := coB.Layers[proto.DiskSystem]
	fb2, err := lapB.lp.Follow(ctx, cB, w.desktop, laptop.FollowOptions{})
	if err != nil || fb2.Staged != ciA.Version || fb2.Runs == ciA.Version || fb2.Applied {
		t.Fatalf("B stages: %+v %v (A pushed version %d)", fb2, err, ciA.Version)
	}
	t.Logf("B staged version %d: %d layers, %d stream bytes", fb2.Staged, len(fb2.LayersFetched), fb2.Bytes)
	if _, backing, _ := desktop.TopState(lapB.top(w.desktop, proto.DiskSystem)); backing != before {
		t.Fatalf("staging moved B's running system top onto %s", backing)
	}
	if got := lapB.readAt(w.desktop, proto.DiskSystem, 48*MiB, 1*MiB); bytes.Equal(got, sysPattern) {
		t.Fatal("B's running chain reads A's change before its next start")
	}
	// A device under the user policy gets the user disk alone and may not read
	// a system layer.
	_, tokC, err := w.srv.AddDevice("c", DeviceOptions{Desktops: []string{w.desktop}, Policy: proto.PolicyUser})
	if err != nil {
		t.Fatal(err)
	}
	cC := w.client(tokC)
	mc, err := cC.Manifest(ctx, w.desktop)
	if err != nil || len(mc.Disks) != 1 || mc.Disks[0].Name != proto.DiskUser || mc.Policy != proto.PolicyUser {
		t.Fatalf("a user device's manifest: %+v %v", mc, err)
	}
	for _, id := range []string{ciA.Layers[proto.DiskSystem], w.base, w.app} {
		if _, err := cC.Layer(ctx, id); !errors.Is(err, proto.ErrNotFound) {
			t.Errorf("a user device reads system layer %s: %v", id[:12], err)
		}
	}
	if _, err := cC.Layer(ctx, ciA.Layers[proto.DiskUser]); err != nil {
		t.Errorf("a user device reads the user layer: %v", err)
	}
	// It keeps a copy of the user disk alone, pushes its changes, and cannot
	// take the active role.
	lapC := newLaptop(t, "c")
	fc, err := lapC.lp.Follow(ctx, cC, w.desktop, laptop.FollowOptions{})
	if err != nil || !fc.SetUp || fc.Policy != proto.PolicyUser {
		t.Fatalf("a user device follows: %+v %v", fc, err)
	}
	for _, id := range fc.LayersFetched {
		if id == w.base || id == w.app || id == ciA.Layers[proto.DiskSystem] {
			t.Errorf("the user device fetched system layer %s", id[:12])
		}
	}
	if dc, err := lapC.store.Desktop(w.desktop); err != nil || dc.SystemDisk != "" || dc.UserDisk == "" {
		t.Fatalf("the user device's copy: %+v %v", dc, err)
	}
	if got := lapC.readAt(w.desktop, proto.DiskUser, 0, 1*MiB); !bytes.Equal(got, userPattern) {
		t.Fatal("the user device does not read A's user change")
	}
	if _, err := lapC.lp.Open(ctx, cC, w.desktop, laptop.OpenOptions{}); !errors.Is(err, proto.ErrForbidden) {
		t.Fatalf("a user device opens the desktop: %v", err)
	}
	// The device view says so.
	members, err := w.srv.DesktopDevices(w.desktop)
	if err != nil {
		t.Fatal(err)
	}
	if len(members) != 3 || members[0].Device != "b" || members[0].Staged != ciA.Version || members[0].Role != "inactive" ||
		members[0].Fetched != fb2.Bytes || members[2].Role != "active" {
		t.Fatalf("desktop devices: %+v", members)
	}
	// At its next start (the VM down) the update applies.
	if applied, err := lapB.lp.ApplyStaged(ctx, w.desktop); err != nil || !applied {
		t.Fatalf("apply the staged update: %v %v", applied, err)
	}
	for _, c := range []struct {
		dn   string
		off  int64
		want []byte
		what string
	}{
		{proto.DiskSystem, 48 * MiB, sysPattern, "A's system change"},
		{proto.DiskSystem, 40 * MiB, drvPattern, "its own driver layer"},
		{proto.DiskSystem, 0, testutil.Fill(1, 8*MiB, false), "the common base"},
		{proto.DiskUser, 0, userPattern, "A's user change"},
	} {
		if got := lapB.readAt(w.desktop, c.dn, c.off, int64(len(c.want))); !bytes.Equal(got, c.want) {
			t.Errorf("after the switch B does not read %s", c.what)
		}
	}

	// B's system change is refused while it is inactive, naming A; its user
	// change is taken.
	lapB.writeAt(w.desktop, proto.DiskSystem, []write{{off: 50 * MiB, data: testutil.Fill(7, 256*KiB, false)}})
	bUser := testutil.Fill(8, 512*KiB, false)
	lapB.writeAt(w.desktop, proto.DiskUser, []write{{off: 4 * MiB, data: bUser}})
	_, err = lapB.lp.CheckIn(ctx, w.desktop, laptop.CheckinOptions{})
	if !errors.Is(err, proto.ErrNotActive) || !strings.Contains(err.Error(), "laptop1") {
		t.Fatalf("B pushes its system disk while inactive: %v; want ErrNotActive naming laptop1", err)
	}
	ciB, err := lapB.lp.CheckIn(ctx, w.desktop, laptop.CheckinOptions{UserOnly: true})
	if err != nil || ciB.Conflict || ciB.Head != ciB.Version {
		t.Fatalf("B pushes its user disk: %+v %v", ciB, err)
	}
	_, head := w.head()
	if head.System != ciA.Layers[proto.DiskSystem] || head.User != ciB.Layers[proto.DiskUser] {
		t.Fatalf("head after B's user push: %+v; want A's system layer and B's user layer", head)
	}
	// A pushes a system change from the version before B's: it moves the head
	// (B changed only the user disk), which keeps B's user layer.
	lapA.writeAt(w.desktop, proto.DiskSystem, []write{{off: 52 * MiB, data: testutil.Fill(9, 256*KiB, false)}})
	ciA2, err := lapA.lp.CheckIn(ctx, w.desktop, laptop.CheckinOptions{})
	if err != nil || ciA2.Conflict {
		t.Fatalf("A pushes after B's user push: %+v %v", ciA2, err)
	}
	_, head = w.head()
	if head.User != ciB.Layers[proto.DiskUser] || head.System != ciA2.Layers[proto.DiskSystem] {
		t.Fatalf("head after A's push: %+v", head)
	}
	// B's user change reaches A at A's next start: staged, then applied.
	fa, err := lapA.lp.Follow(ctx, cA, w.desktop, laptop.FollowOptions{})
	if err != nil || !fa.Active || fa.Staged != ciA2.Version {
		t.Fatalf("A stages B's user push: %+v %v", fa, err)
	}
	if got := lapA.readAt(w.desktop, proto.DiskUser, 4*MiB, 512*KiB); bytes.Equal(got, bUser) {
		t.Fatal("A's running chain reads B's user change before its next start")
	}
	if applied, err := lapA.lp.ApplyStaged(ctx, w.desktop); err != nil || !applied {
		t.Fatalf("A applies: %v %v", applied, err)
	}
	if got := lapA.readAt(w.desktop, proto.DiskUser, 4*MiB, 512*KiB); !bytes.Equal(got, bUser) {
		t.Fatal("A does not read B's user change at its next start")
	}

	// B opens the desktop: asked within the minimum interval, it is refused.
	if _, err := lapB.lp.Open(ctx, cB, w.desktop, laptop.OpenOptions{Wait: time.Minute, Poll: 10 * time.Millisecond}); !errors.Is(err, proto.ErrTooSoon) {
		t.Fatalf("open within the minimum interval: %v", err)
	}
	w.now = w.now.Add(time.Minute)
	// Its snapshot comes first (its system change); A, told on its next poll,
	// syncs up and steps down; B checks the head out.
	lapA.writeAt(w.desktop, proto.DiskUser, []write{{off: 8 * MiB, data: testutil.Fill(10, 256*KiB, false)}})
	type result struct {
		rep *laptop.OpenReport
		err error
	}
	done := make(chan result, 1)
	go func() {
		rep, err := lapB.lp.Open(ctx, cB, w.desktop, laptop.OpenOptions{Wait: time.Minute, Poll: 10 * time.Millisecond})
		done <- result{rep, err}
	}()
	var to string
	for deadline := time.Now().Add(10 * time.Second); to == "" && time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		var asked bool
		if asked, to, err = lapA.lp.HandOver(ctx, w.desktop); err != nil {
			t.Fatal(err)
		} else if !asked {
			to = ""
		}
	}
	if to != "b" {
		t.Fatalf("A was not asked to hand over to b (%q)", to)
	}
	r := <-done
	if r.err != nil || r.rep.Snapshot == 0 || r.rep.Previous != "laptop1" || r.rep.Broken || r.rep.Checkout == nil {
		t.Fatalf("B opens: %+v %v", r.rep, r.err)
	}
	st, err := w.srv.DesktopStatus(w.desktop)
	if err != nil {
		t.Fatal(err)
	}
	snap := st.Versions[slices.IndexFunc(st.Versions, func(v proto.Version) bool { return v.N == r.rep.Snapshot })]
	if snap.Kind != images.VersionSnapshot || snap.Device != "b" || st.Head == snap.N {
		t.Fatalf("B's snapshot: %+v (head %d)", snap, st.Head)
	}
	if st.Lease == nil || st.Lease.DeviceName != "b" || st.Head <= snap.N {
		t.Fatalf("after B opened: lease %+v, head %d, snapshot %d", st.Lease, st.Head, snap.N)
	}
	if got := lapB.readAt(w.desktop, proto.DiskUser, 8*MiB, 256*KiB); !bytes.Equal(got, testutil.Fill(10, 256*KiB, false)) {
		t.Fatal("B does not read what A synced up before it stepped down")
	}

	// A opens it back while B does not answer: past the wait B's lease is
	// broken, and B's later check-in is a conflict version.
	w.now = w.now.Add(time.Minute)
	ctx1, cancel := context.WithTimeout(ctx, 300*time.Millisecond)
	_, err = lapA.lp.Open(ctx1, cA, w.desktop, laptop.OpenOptions{Wait: time.Minute, Poll: 10 * time.Millisecond})
	cancel()
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("A's open while B holds the role and does not answer: %v; want it to wait", err)
	}
	lapB.writeAt(w.desktop, proto.DiskUser, []write{{off: 12 * MiB, data: testutil.Fill(11, 256*KiB, false)}})
	w.now = w.now.Add(2 * time.Minute)
	ra, err := lapA.lp.Open(ctx, cA, w.desktop, laptop.OpenOptions{Wait: time.Minute, Poll: 10 * time.Millisecond})
	if err != nil || !ra.Broken || ra.Previous != "b" || ra.Checkout == nil {
		t.Fatalf("A opens past the wait: %+v %v", ra, err)
	}
	late, err := lapB.lp.CheckIn(ctx, w.desktop, laptop.CheckinOptions{})
	if err != nil || !late.Conflict {
		t.Fatalf("B's check-in after its lease was broken: %+v %v; want a conflict version", late, err)
	}
	// No version was lost: each push is a version of the desktop.
	st, err = w.srv.DesktopStatus(w.desktop)
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range []int{ciA.Version, ciB.Version, ciA2.Version, snap.N, late.Version} {
		if !slices.ContainsFunc(st.Versions, func(v proto.Version) bool { return v.N == n }) {
			t.Errorf("version %d is gone", n)
		}
	}
	if got := lapA.readAt(w.desktop, proto.DiskUser, 4*MiB, 512*KiB); !bytes.Equal(got, bUser) {
		t.Error("A does not read B's user change after it opened the desktop again")
	}
}

// TestBootTravels: the desktop's boot configuration (a kernel, an initrd, a
// command line, memory, vCPUs, a NIC) travels with it: each device gets the
// files (checked by their SHA-256) and defines its VM from it with an identity
// of its own, never synced. A check-in redefines only the VM's disks (its
// user's edits stay); a changed boot configuration is staged and applied at
// the next start.
func TestBootTravels(t *testing.T) {
	ctx := context.Background()
	w := newWorld(t, worldSpec{baseSize: 16 * MiB, baseWrites: []write{{off: 0, data: testutil.Fill(1, MiB, false)}}, userSize: 8 * MiB})
	kernel, initrd := testutil.Fill(2, 300*KiB, false), testutil.Fill(3, 200*KiB, false)
	ksum, err := w.store.AddBootFile(bytes.NewReader(kernel), "", 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	isum, err := w.store.AddBootFile(bytes.NewReader(initrd), "", 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	boot := &images.DesktopBoot{Kernel: ksum, Initrd: isum, Cmdline: "console=ttyS0 cvd.pattern=0x5a", MemoryMiB: 768, VCPUs: 2, NICs: 1}
	if _, err := w.store.SetDesktopBoot(w.desktop, boot); err != nil {
		t.Fatal(err)
	}
	if _, err := w.store.SetDesktopBoot(w.desktop, &images.DesktopBoot{Kernel: strings.Repeat("ab", 32)}); !errors.Is(err, images.ErrNotFound) {
		t.Fatalf("a boot configuration naming a file the store lacks: %v", err)
	}
	_, tokB, err := w.srv.AddDevice("b", DeviceOptions{Desktops: []string{w.desktop}})
	if err != nil {
		t.Fatal(err)
	}
	lapA, lapB := newLaptop(t, "a"), newLaptop(t, "b")
	vmA, vmB := &recordVM{}, &recordVM{}
	lapA.reopen(laptop.LaptopOptions{VM: vmA})
	lapB.reopen(laptop.LaptopOptions{VM: vmB})
	if _, err := lapA.lp.CheckOut(ctx, w.client(w.token), w.desktop, laptop.CheckoutOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := lapB.lp.Follow(ctx, w.client(tokB), w.desktop, laptop.FollowOptions{}); err != nil {
		t.Fatal(err)
	}
	if len(vmA.defined) != 1 || len(vmB.defined) != 1 {
		t.Fatalf("defines: A %d, B %d", len(vmA.defined), len(vmB.defined))
	}
	a, b := vmA.defined[0], vmB.defined[0]
	for _, d := range []struct {
		who string
		vm  vm.DesktopVM
		lap *testLaptop
	}{{"A", a, lapA}, {"B", b, lapB}} {
		if d.vm.Cmdline != boot.Cmdline || d.vm.MemoryMiB != 768 || d.vm.VCPUs != 2 || !d.vm.NIC || !d.vm.ApplyBoot {
			t.Errorf("%s's VM: %+v", d.who, d.vm)
		}
		if !strings.HasPrefix(d.vm.Kernel, d.lap.dir) || !strings.HasPrefix(d.vm.Initrd, d.lap.dir) || !exists(d.vm.SeedISO) {
			t.Errorf("%s's VM boots from files outside its store: %+v", d.who, d.vm)
		}
		if got, err := os.ReadFile(d.vm.Kernel); err != nil || !bytes.Equal(got, kernel) {
			t.Errorf("%s's kernel: %v", d.who, err)
		}
	}
	if a.UUID == "" || a.UUID == b.UUID || a.MAC == b.MAC {
		t.Errorf("identities: A %s %s, B %s %s: each device's own", a.UUID, a.MAC, b.UUID, b.MAC)
	}
	// A check-in redefines the disks only, with the same identity.
	lapA.writeAt(w.desktop, proto.DiskSystem, []write{{off: 4 * MiB, data: testutil.Fill(4, 64*KiB, false)}})
	if _, err := lapA.lp.CheckIn(ctx, w.desktop, laptop.CheckinOptions{}); err != nil {
		t.Fatal(err)
	}
	if n := len(vmA.defined); n != 2 || vmA.defined[1].ApplyBoot || vmA.defined[1].UUID != a.UUID || vmA.defined[1].MAC != a.MAC {
		t.Fatalf("after the check-in: %+v", vmA.defined[n-1])
	}
	// A new boot configuration reaches B at its next start.
	boot2 := *boot
	boot2.MemoryMiB = 1024
	if _, err := w.store.SetDesktopBoot(w.desktop, &boot2); err != nil {
		t.Fatal(err)
	}
	fb, err := lapB.lp.Follow(ctx, w.client(tokB), w.desktop, laptop.FollowOptions{Apply: true})
	if err != nil || !fb.Applied {
		t.Fatalf("B follows the new boot configuration: %+v %v", fb, err)
	}
	last := vmB.defined[len(vmB.defined)-1]
	if last.MemoryMiB != 1024 || !last.ApplyBoot || last.UUID != b.UUID {
		t.Fatalf("B's VM after the new boot configuration: %+v", last)
	}
}

// TestInactiveNextStart: an inactive device that ran (its tops hold changes on
// both disks) takes a staged update at its next start: its user disk's changes
// are pushed, its system disk's kept as a snapshot version, then its tops move
// onto the head. Nothing is lost.
func TestInactiveNextStart(t *testing.T) {
	ctx := context.Background()
	w := newWorld(t, worldSpec{baseSize: 16 * MiB, baseWrites: []write{{off: 0, data: testutil.Fill(1, MiB, false)}}, userSize: 8 * MiB})
	_, tokB, err := w.srv.AddDevice("b", DeviceOptions{Desktops: []string{w.desktop}})
	if err != nil {
		t.Fatal(err)
	}
	lapA, lapB := newLaptop(t, "a"), newLaptop(t, "b")
	cA, cB := w.client(w.token), w.client(tokB)
	if _, err := lapA.lp.Open(ctx, cA, w.desktop, laptop.OpenOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := lapB.lp.Follow(ctx, cB, w.desktop, laptop.FollowOptions{}); err != nil {
		t.Fatal(err)
	}
	// B runs: its guest writes both disks. A pushes a new version.
	bSys, bUser := testutil.Fill(2, 128*KiB, false), testutil.Fill(3, 128*KiB, false)
	lapB.writeAt(w.desktop, proto.DiskSystem, []write{{off: 6 * MiB, data: bSys}})
	lapB.writeAt(w.desktop, proto.DiskUser, []write{{off: 2 * MiB, data: bUser}})
	aSys := testutil.Fill(4, 128*KiB, false)
	lapA.writeAt(w.desktop, proto.DiskSystem, []write{{off: 4 * MiB, data: aSys}})
	ciA, err := lapA.lp.CheckIn(ctx, w.desktop, laptop.CheckinOptions{})
	if err != nil {
		t.Fatal(err)
	}
	fb, err := lapB.lp.Follow(ctx, cB, w.desktop, laptop.FollowOptions{Apply: true})
	if err != nil || !fb.Applied || fb.Pushed == 0 || fb.Snapshot == 0 {
		t.Fatalf("B's next start: %+v %v", fb, err)
	}
	st, err := w.srv.DesktopStatus(w.desktop)
	if err != nil {
		t.Fatal(err)
	}
	for _, v := range st.Versions {
		switch v.N {
		case fb.Snapshot:
			if v.Kind != images.VersionSnapshot || v.Device != "b" {
				t.Errorf("B's system changes: %+v", v)
			}
		case fb.Pushed:
			if v.Kind != images.VersionCheckin || v.System != ciA.Layers[proto.DiskSystem] {
				t.Errorf("B's user push: %+v (A's system layer %s)", v, ciA.Layers[proto.DiskSystem][:12])
			}
		}
	}
	if st.Head != fb.Pushed || fb.Runs != st.Head {
		t.Fatalf("head %d, B pushed %d and runs %d", st.Head, fb.Pushed, fb.Runs)
	}
	if !bytes.Equal(lapB.readAt(w.desktop, proto.DiskSystem, 4*MiB, 128*KiB), aSys) ||
		!bytes.Equal(lapB.readAt(w.desktop, proto.DiskUser, 2*MiB, 128*KiB), bUser) {
		t.Fatal("after its next start B does not read A's system change and its own user change")
	}
	if has, _, _ := desktop.TopState(lapB.top(w.desktop, proto.DiskSystem)); has {
		t.Fatal("B's system top still holds its changes (they are in the snapshot version)")
	}
}
