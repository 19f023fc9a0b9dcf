package syncd

import (
	"context"
	"path/filepath"
	"slices"
	"testing"

	"github.com/cvd-project/cvd/syncd/laptop"

	"github.com/cvd-project/cvd/syncd/state"

	"github.com/cvd-project/cvd/desktop"
	"github.com/cvd-project/cvd/disk"
	"github.com/cvd-project/cvd/images"
	"github.com/cvd-project/cvd/internal/testutil"
	"github.com/cvd-project/cvd/syncd/proto"
)

// bigSpec is the desktop of the first "Done when": a 1 GiB base holding
// 96 MiB of random data and 64 MiB of text, a 16 MiB app layer, and server-side
// changes on the system and the (blank, 512 MiB) user disk that the first
// check-out seals as the user's version.
func bigSpec() worldSpec {
	return worldSpec{
		baseSize: 1 * GiB,
		baseWrites: []write{
			{off: 0, data: testutil.Fill(1, 96*MiB, false)},
			{off: 256 * MiB, data: testutil.Fill(2, 64*MiB, true)},
		},
		appWrites:  []write{{off: 512 * MiB, data: testutil.Fill(3, 16*MiB, false)}},
		userSize:   512 * MiB,
		sysWrites:  []write{{off: 600 * MiB, data: testutil.Fill(4, 8*MiB, false)}},
		userWrites: []write{{off: 0, data: testutil.Fill(5, 8*MiB, false)}, {off: 100 * MiB, data: testutil.Fill(6, 4*MiB, true)}},
	}
}

// laptopWrites is the laptop's work: 64 MiB of new random data, 64 MiB copied from
// clusters of the base (the server holds them), and zeroed ranges over data of
// the base and of the user's version.
func laptopWrites(t *testing.T, lap *testLaptop, desktop string) {
	t.Helper()
	sys, err := disk.Open(lap.top(desktop, proto.DiskSystem), disk.OpenOptions{AllowedRoots: []string{lap.dir}})
	if err != nil {
		t.Fatal(err)
	}
	copied := make([]byte, 64*MiB)
	if _, err := sys.ReadAt(copied, 16*MiB); err != nil {
		t.Fatal(err)
	}
	applyWrites(t, sys, []write{
		{off: 700 * MiB, data: testutil.Fill(10, 64*MiB, false)},
		{off: 800 * MiB, data: copied},
		{off: 256 * MiB, zero: 16 * MiB},
		{off: 960 * MiB, zero: 8 * MiB}, // never written anywhere: zero clusters over nothing
	})
	sys.Close()
	user, err := disk.Open(lap.top(desktop, proto.DiskUser), disk.OpenOptions{AllowedRoots: []string{lap.dir}})
	if err != nil {
		t.Fatal(err)
	}
	applyWrites(t, user, []write{{off: 2 * MiB, zero: 2 * MiB}})
	user.Close()
}

func TestCheckoutCheckinDoneWhen(t *testing.T) {
	if testing.Short() {
		t.Skip("moves a few hundred MiB")
	}
	ctx := context.Background()
	w := newWorld(t, bigSpec())
	c := w.client(w.token)

	// 1. Check out to an empty store.
	lap := newLaptop(t, "laptop")
	co, err := lap.lp.CheckOut(ctx, c, w.desktop, laptop.CheckoutOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("check-out to an empty store: version %d, %d layers, %d bytes of stream carrying %d bytes of clusters, %.2fs",
		co.Version, len(co.LayersFetched), co.Bytes, co.DataBytes, co.Took)
	if co.Sealed != 2 || co.Version != 2 || len(co.LayersFetched) != 4 {
		t.Fatalf("check-out: sealed %d, version %d, fetched %d layers", co.Sealed, co.Version, len(co.LayersFetched))
	}
	headN, head := w.head()
	qemuCompare(t, w.store.LayerPath(head.System), lap.top(w.desktop, proto.DiskSystem))
	qemuCompare(t, w.store.LayerPath(head.User), lap.top(w.desktop, proto.DiskUser))

	// 2. Work on the laptop, check in.
	laptopWrites(t, lap, w.desktop)
	ci, err := lap.lp.CheckIn(ctx, w.desktop, laptop.CheckinOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("check-in: %d changed clusters (%d data bytes); sent %d clusters: payload %d bytes + metadata %d bytes; %d deduplicated; %.2fs (transfer+commit %.2fs)",
		ci.Changed, ci.ChangedBytes, ci.Sent, ci.Payload, ci.Metadata, ci.Deduplicated, ci.Took, ci.TookUpload)
	if limit := 64 * MiB * 105 / 100; ci.Payload > limit {
		t.Errorf("check-in payload %d bytes, want ≤ %d (1.05 × 64 MiB)", ci.Payload, limit)
	}
	if ci.Deduplicated != 1024 {
		t.Errorf("deduplicated %d clusters, want the 1024 copied from the base", ci.Deduplicated)
	}
	if ci.Conflict || ci.Version != headN+1 || ci.Head != ci.Version {
		t.Fatalf("check-in made version %d (head %d, conflict %v), want head %d", ci.Version, ci.Head, ci.Conflict, headN+1)
	}
	n, head := w.head()
	if n != ci.Version {
		t.Fatalf("server head %d", n)
	}
	// The laptop froze its tops as that version and started fresh ones.
	for _, dn := range proto.DiskNames {
		has, backing, err := desktop.TopState(lap.top(w.desktop, dn))
		if err != nil {
			t.Fatal(err)
		}
		if has || backing != state.LayerOf(head, dn) {
			t.Errorf("laptop %s top: data %v, stands on %s, want an empty top on %s", dn, has, state.Short(backing), state.Short(state.LayerOf(head, dn)))
		}
	}
	qemuCompare(t, w.store.LayerPath(head.System), lap.top(w.desktop, proto.DiskSystem))
	qemuCompare(t, w.store.LayerPath(head.User), lap.top(w.desktop, proto.DiskUser))
	// The server's own tops stand on the new head too.
	d, err := w.store.Desktop(w.desktop)
	if err != nil {
		t.Fatal(err)
	}
	qemuCompare(t, w.store.Path(d.SystemDisk), lap.top(w.desktop, proto.DiskSystem))

	// 3. A fresh check-out to a third store reads the same (another device).
	_, tok3, err := w.srv.AddDevice("laptop3", DeviceOptions{Desktops: []string{w.desktop}})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := w.srv.BreakLease(w.desktop); err != nil {
		t.Fatal(err)
	}
	third := newLaptop(t, "third")
	co3, err := third.lp.CheckOut(ctx, w.client(tok3), w.desktop, laptop.CheckoutOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("fresh check-out to a third store: %d layers, %d bytes", len(co3.LayersFetched), co3.Bytes)
	qemuCompare(t, third.top(w.desktop, proto.DiskSystem), lap.top(w.desktop, proto.DiskSystem))
	qemuCompare(t, third.top(w.desktop, proto.DiskUser), lap.top(w.desktop, proto.DiskUser))

	// 4. A laptop that holds the base and the app layer fetches only the versions.
	_, tok4, err := w.srv.AddDevice("laptop4", DeviceOptions{Desktops: []string{w.desktop}})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := w.srv.BreakLease(w.desktop); err != nil {
		t.Fatal(err)
	}
	fourth := newLaptop(t, "fourth")
	src := t.TempDir()
	spec := bigSpec()
	makeImage(t, filepath.Join(src, "base.qcow2"), spec.baseSize, "", spec.baseWrites)
	makeImage(t, filepath.Join(src, "app.qcow2"), 0, filepath.Join(src, "base.qcow2"), spec.appWrites)
	bl, _, err := fourth.store.Import(ctx, filepath.Join(src, "base.qcow2"), images.ImportOptions{})
	if err != nil {
		t.Fatal(err)
	}
	al, _, err := fourth.store.Import(ctx, filepath.Join(src, "app.qcow2"), images.ImportOptions{Parent: bl.ID})
	if err != nil {
		t.Fatal(err)
	}
	if bl.ID != w.base || al.ID != w.app {
		t.Fatalf("the same content imported elsewhere has other IDs: %s %s", state.Short(bl.ID), state.Short(al.ID))
	}
	co4, err := fourth.lp.CheckOut(ctx, w.client(tok4), w.desktop, laptop.CheckoutOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("check-out to a store holding base and app: fetched %d layers (%d bytes, %d clusters as references), held %d",
		len(co4.LayersFetched), co4.Bytes, co4.ClustersByRef, len(co4.LayersHeld))
	if co4.ClustersByRef < 1024 {
		t.Errorf("%d clusters came as references; the 1024 the laptop copied from the base are held there", co4.ClustersByRef)
	}
	if slices.Contains(co4.LayersFetched, w.base) || slices.Contains(co4.LayersFetched, w.app) || len(co4.LayersHeld) != 2 {
		t.Errorf("fetched %v, held %v: base and app should not move", co4.LayersFetched, co4.LayersHeld)
	}
	if co4.Bytes >= co3.Bytes {
		t.Errorf("moved %d bytes, a full check-out moved %d", co4.Bytes, co3.Bytes)
	}
	qemuCompare(t, fourth.top(w.desktop, proto.DiskSystem), lap.top(w.desktop, proto.DiskSystem))
	qemuCompare(t, fourth.top(w.desktop, proto.DiskUser), lap.top(w.desktop, proto.DiskUser))
}
