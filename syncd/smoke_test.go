package syncd

import (
	"context"
	"testing"

	"github.com/cvd-project/cvd/syncd/laptop"

	"github.com/cvd-project/cvd/disk"
	"github.com/cvd-project/cvd/internal/testutil"
	"github.com/cvd-project/cvd/syncd/proto"
)

func TestSmokeCheckoutCheckin(t *testing.T) {
	ctx := context.Background()
	w := newWorld(t, worldSpec{
		baseSize:   256 * MiB,
		baseWrites: []write{{off: 0, data: testutil.Fill(1, 4*MiB, false)}, {off: 100 * MiB, data: testutil.Fill(2, 4*MiB, true)}},
		appWrites:  []write{{off: 8 * MiB, data: testutil.Fill(3, 2*MiB, false)}},
		userSize:   64 * MiB,
		sysWrites:  []write{{off: 20 * MiB, data: testutil.Fill(4, 1*MiB, false)}},
		userWrites: []write{{off: 0, data: testutil.Fill(5, 1*MiB, false)}},
	})
	lap := newLaptop(t, "laptop")
	c := w.client(w.token)
	rep, err := lap.lp.CheckOut(ctx, c, w.desktop, laptop.CheckoutOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("checkout: %+v", rep)
	// Write on the laptop.
	img, err := disk.Open(lap.top(w.desktop, proto.DiskSystem), disk.OpenOptions{AllowedRoots: []string{lap.dir}})
	if err != nil {
		t.Fatal(err)
	}
	applyWrites(t, img, []write{{off: 50 * MiB, data: testutil.Fill(9, 3*MiB, false)}, {off: 0, zero: 1 * MiB}})
	// copy of a base cluster range
	buf := make([]byte, 2*MiB)
	img.ReadAt(buf, 0+2*MiB)
	applyWrites(t, img, []write{{off: 200 * MiB, data: buf}})
	img.Close()
	crep, err := lap.lp.CheckIn(ctx, w.desktop, laptop.CheckinOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("checkin: %+v", crep)
	n, hv := w.head()
	if n != crep.Version {
		t.Fatalf("head %d, check-in made %d", n, crep.Version)
	}
	qemuCompare(t, w.store.LayerPath(hv.System), lap.top(w.desktop, proto.DiskSystem))
	qemuCompare(t, w.store.LayerPath(hv.User), lap.top(w.desktop, proto.DiskUser))
}
