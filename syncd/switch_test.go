package syncd

import (
	"context"
	"net/http/httptest"
	"path/filepath"
	"testing"
	"time"

	"github.com/cvd-project/cvd/syncd/laptop"

	"github.com/cvd-project/cvd/desktop"
	"github.com/cvd-project/cvd/images"
	"github.com/cvd-project/cvd/internal/testutil"
	"github.com/cvd-project/cvd/syncd/proto"
)

// TestRecomposeMarkedWhileCheckedOut: a recompose requested while a laptop holds
// the desktop only marks it; the next check-out (the desktop's next start) carries
// the switch out through the BeforeCheckout hook, and the new laptop gets the
// desktop on the new app layer.
func TestRecomposeMarkedWhileCheckedOut(t *testing.T) {
	ctx := context.Background()
	w := newWorld(t, smallSpec())
	w.stop()
	srv, err := NewServer(w.store, ServerOptions{Now: func() time.Time { return w.now }, Logger: testLogger(),
		BeforeCheckout: func(ctx context.Context, name string) error {
			_, err := desktop.ApplySwitch(ctx, w.store, name)
			return err
		}})
	if err != nil {
		t.Fatal(err)
	}
	w.srv, w.http = srv, httptest.NewServer(srv.Handler())

	app2src := filepath.Join(t.TempDir(), "app2.qcow2")
	makeImage(t, app2src, 0, w.store.LayerPath(w.base), []write{{off: 40 * MiB, data: testutil.Fill(7, 3*MiB, false)}})
	app2, _, err := w.store.Import(ctx, app2src, images.ImportOptions{Parent: w.base, Names: []string{"app:2"}})
	if err != nil {
		t.Fatal(err)
	}

	lap := newLaptop(t, "laptop")
	if _, err := lap.lp.CheckOut(ctx, w.client(w.token), w.desktop, laptop.CheckoutOptions{}); err != nil {
		t.Fatal(err)
	}
	rep, err := desktop.Recompose(ctx, w.store, desktop.RecomposeSpec{Desktops: []string{w.desktop}, Apps: []string{app2.ID}})
	if err != nil {
		t.Fatal(err)
	}
	if rep.Marked != 1 {
		t.Fatalf("a checked-out desktop was not marked: %+v", rep.Desktops)
	}
	d, _ := w.store.Desktop(w.desktop)
	if d.Switch == nil || d.HeadVersion().System == app2.ID {
		t.Fatalf("after the recompose request: switch %+v, head system %s", d.Switch, d.HeadVersion().System)
	}
	if err := lap.lp.Release(ctx, w.desktop, false); err != nil {
		t.Fatal(err)
	}

	lap2 := newLaptop(t, "laptop2")
	if _, err := lap2.lp.CheckOut(ctx, w.client(w.token), w.desktop, laptop.CheckoutOptions{}); err != nil {
		t.Fatal(err)
	}
	d, _ = w.store.Desktop(w.desktop)
	if d.Switch != nil || d.HeadVersion().System != app2.ID {
		t.Fatalf("after the next check-out: switch %+v, head system %s", d.Switch, d.HeadVersion().System)
	}
	qemuCompare(t, lap2.top(w.desktop, proto.DiskSystem), w.store.LayerPath(app2.ID))
}
