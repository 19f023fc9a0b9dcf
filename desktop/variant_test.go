package desktop

import (
	"bytes"
	"context"
	"errors"
	"testing"
	"time"

	"github.com/cvd-project/cvd/disk"
	"github.com/cvd-project/cvd/images"
	"github.com/cvd-project/cvd/internal/labtest"
	"github.com/cvd-project/cvd/internal/testutil"
)

// TestOnVariant: a desktop on base → app with two versions, recomposed onto a
// variant (base → driver layer): every cluster reads as the desktop's layers
// write it where they allocate it, else as the variant reads; QEMU compares the
// recomposed chain with that expectation; a second call makes nothing; a new
// version costs one layer; gc keeps the recomposed chain while the desktop
// stands on what it copies.
func TestOnVariant(t *testing.T) {
	testutil.NeedQemu(t)
	ctx := context.Background()
	s := newStoreLab(t, labtest.Seed(t))
	base, app1, _, desks := s.fixture(1, 8<<20)
	drv := s.appOn(base, "drv:hw2", 12)
	name := desks[0]
	if _, err := VariantFor(s.st, "hw2", app1.ID); !errors.Is(err, ErrNoVariant) {
		t.Fatalf("variant before one is registered: %v", err)
	}
	v, err := RegisterVariant(s.st, "hw2", drv.ID, "")
	if err != nil {
		t.Fatal(err)
	}
	if v.Base != base.ID {
		t.Fatalf("variant base %s, want the driver layer's parent %s", v.Base, base.ID)
	}
	// Two versions on the app.
	for range 2 {
		d, err := s.st.Desktop(name)
		if err != nil {
			t.Fatal(err)
		}
		s.Scribble(s.st.Path(d.SystemDisk), 6)
		if _, _, err := SealTops(ctx, s.st, name, "test", time.Now()); err != nil {
			t.Fatal(err)
		}
	}
	d, err := s.st.Desktop(name)
	if err != nil {
		t.Fatal(err)
	}
	head := d.HeadVersion().System
	got, err := VariantFor(s.st, "hw2", head)
	if err != nil || got.Layer != drv.ID {
		t.Fatalf("VariantFor: %+v %v", got, err)
	}
	vc, err := OnVariant(ctx, s.st, head, *got)
	if err != nil {
		t.Fatal(err)
	}
	if vc.Made != 3 || vc.Reused != 0 {
		t.Errorf("made %d reused %d, want 3 (the app and two versions) and 0", vc.Made, vc.Reused)
	}
	checkVariantChain(t, s, head, drv.ID, vc)

	// The conflict count against a brute force over the clusters.
	above, err := s.st.Chain(head)
	if err != nil {
		t.Fatal(err)
	}
	want := bruteOverlap(t, s, above[:len(above)-1], drv.ID)
	t.Logf("recomposed onto the variant: %d layers, %d bytes, %d conflict clusters", vc.Made, vc.Bytes, vc.Conflicts)
	if vc.Conflicts != want {
		t.Errorf("conflict clusters %d, brute force %d", vc.Conflicts, want)
	}

	again, err := OnVariant(ctx, s.st, head, *got)
	if err != nil || again.Made != 0 || again.Reused != 3 || again.System != vc.System || again.Conflicts != vc.Conflicts {
		t.Fatalf("second call: %+v %v; want 0 made, 3 reused, system %s, %d conflicts (as counted)", again, err, vc.System, vc.Conflicts)
	}
	// A new version costs one layer.
	s.Scribble(s.st.Path(d.SystemDisk), 4)
	if _, _, err := SealTops(ctx, s.st, name, "test", time.Now()); err != nil {
		t.Fatal(err)
	}
	d, _ = s.st.Desktop(name)
	head2 := d.HeadVersion().System
	vc2, err := OnVariant(ctx, s.st, head2, *got)
	if err != nil || vc2.Made != 1 || vc2.Reused != 3 {
		t.Fatalf("after a new version: %+v %v; want 1 made, 3 reused", vc2, err)
	}
	checkVariantChain(t, s, head2, drv.ID, vc2)
	// gc keeps every recomposed layer: the desktop stands on what each copies.
	rep, err := s.st.GC(ctx, false)
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range rep.Removed {
		t.Errorf("gc removed %s (%s)", images.ShortID(l.ID), l.Kind)
	}
	checkVariantChain(t, s, head2, drv.ID, vc2)
}

// checkVariantChain reads the recomposed chain against the desktop's chain and
// the variant, cluster by cluster, and has qemu-img check each layer.
func checkVariantChain(t *testing.T, s *storeLab, head, variant string, vc *VariantChain) {
	t.Helper()
	chain, err := s.st.Chain(vc.System)
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range chain {
		testutil.QemuCheck(t, s.st.LayerPath(l.ID))
	}
	got, err := s.st.OpenLayer(vc.System, false)
	if err != nil {
		t.Fatal(err)
	}
	defer got.Close()
	desk, err := s.st.OpenLayer(head, false)
	if err != nil {
		t.Fatal(err)
	}
	defer desk.Close()
	vimg, err := s.st.OpenLayer(variant, false)
	if err != nil {
		t.Fatal(err)
	}
	defer vimg.Close()
	own := disk.Layers(desk)
	own = own[:len(own)-1] // above the base
	cs := int64(got.Info().ClusterSize)
	a, b, c := make([]byte, cs), make([]byte, cs), make([]byte, cs)
	for off := int64(0); off < got.Size(); off += cs {
		held := false
		for _, l := range own {
			exts, err := l.MapLayer(off, cs)
			if err != nil {
				t.Fatal(err)
			}
			for _, e := range exts {
				held = held || e.State != disk.Unallocated
			}
		}
		want := c
		if held {
			want = b
			if err := disk.ReadView(desk, b, off); err != nil {
				t.Fatal(err)
			}
		} else if err := disk.ReadView(vimg, c, off); err != nil {
			t.Fatal(err)
		}
		if err := disk.ReadView(got, a, off); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(a, want) {
			t.Fatalf("cluster at %d reads differently on the variant chain (desktop's layers hold it: %v)", off, held)
		}
	}
}

// bruteOverlap counts the clusters that both the layers above and the
// variant's own layer allocate.
func bruteOverlap(t *testing.T, s *storeLab, above []images.Layer, variant string) int64 {
	t.Helper()
	v, err := s.st.OpenLayer(variant, true)
	if err != nil {
		t.Fatal(err)
	}
	defer v.Close()
	var imgs []disk.Image
	for _, l := range above {
		img, err := s.st.OpenLayer(l.ID, true)
		if err != nil {
			t.Fatal(err)
		}
		defer img.Close()
		imgs = append(imgs, img)
	}
	cs := int64(v.Info().ClusterSize)
	alloc := func(img disk.Image, off int64) bool {
		exts, err := img.MapLayer(off, cs)
		if err != nil {
			t.Fatal(err)
		}
		for _, e := range exts {
			if e.State != disk.Unallocated {
				return true
			}
		}
		return false
	}
	var n int64
	for off := int64(0); off < v.Size(); off += cs {
		if !alloc(v, off) {
			continue
		}
		for _, img := range imgs {
			if alloc(img, off) {
				n++
				break
			}
		}
	}
	return n
}
