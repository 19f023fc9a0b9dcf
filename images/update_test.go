package images

import (
	"context"
	"errors"
	"fmt"
	"os"
	"testing"
	"time"
)

// TestUpdateDesktop moves a desktop from its base to base+app with a new top the
// caller wrote under Begin, then checks refs, files, refusals and rollbacks.
func TestUpdateDesktop(t *testing.T) {
	f := newFixture(t)
	ctx := context.Background()
	d, err := f.s.CreateDesktop(ctx, "d", DesktopSpec{Base: "os:1"})
	if err != nil {
		t.Fatal(err)
	}
	oldTop := d.SystemDisk
	newTop := DesktopsDir + "/d.system.v2.qcow2"

	// An edit that fails changes nothing, and the pending files stay the caller's.
	p, err := f.s.Begin("recompose", []string{newTop})
	if err != nil {
		t.Fatal(err)
	}
	if err := f.s.createTop(newTop, f.app.ID, 0); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		fn   func(d *Desktop) error
		want error
	}{
		{"fn error", func(d *Desktop) error { return ErrExists }, ErrExists},
		{"head not in history", func(d *Desktop) error { d.Head = 9; return nil }, ErrInvalid},
		{"unknown layer", func(d *Desktop) error {
			d.Versions = append(d.Versions, Version{N: 2, System: "00ff"})
			return nil
		}, ErrNotFound},
		{"rename", func(d *Desktop) error { d.Name = "x"; return nil }, ErrInvalid},
		{"duplicate version", func(d *Desktop) error { d.Versions = append(d.Versions, d.Versions[0]); return nil }, ErrInvalid},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if _, err := f.s.UpdateDesktop(p, "d", tc.fn); !errors.Is(err, tc.want) {
				t.Fatalf("err = %v, want %v", err, tc.want)
			}
			got, _ := f.s.Desktop("d")
			if got.Head != 1 || len(got.Versions) != 1 || got.SystemDisk != oldTop {
				t.Fatalf("record changed: %+v", got)
			}
		})
	}

	d, err = f.s.UpdateDesktop(p, "d", func(d *Desktop) error {
		d.Versions = append(d.Versions, Version{N: 2, System: f.app.ID, From: 1, Note: "recompose", Created: time.Now()})
		d.Head = 2
		d.SystemDisk = newTop
		d.Switch = &PendingSwitch{System: f.base2.ID, FromHead: 2, Policy: "keep"}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if d.Head != 2 || d.SystemDisk != newTop {
		t.Fatalf("record: %+v", d)
	}
	if _, err := os.Stat(f.s.Path(oldTop)); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("old top still there: %v", err)
	}
	if _, err := os.Stat(f.s.Path(newTop)); err != nil {
		t.Fatalf("new top: %v", err)
	}
	if err := p.Abort(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(f.s.Path(newTop)); err != nil {
		t.Fatal("Abort after the commit removed the desktop's new top")
	}
	// Every layer the record names is kept: versions and the pending switch.
	for _, ref := range []string{"os:1", "office:1", "os2:1"} {
		if _, err := f.s.RemoveLayer(ref); !errors.Is(err, ErrHasDependents) {
			t.Errorf("rm %s: %v, want ErrHasDependents", ref, err)
		}
	}
	mustClean(t, f.s)

	// Dropping the switch and version 1 releases base2 but not the base (the app
	// stands on it).
	if _, err := f.s.UpdateDesktop(nil, "d", func(d *Desktop) error {
		d.Switch = nil
		d.Versions = d.Versions[1:]
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	if _, err := f.s.RemoveLayer("os2:1"); err != nil {
		t.Fatalf("rm of a layer nothing keeps: %v", err)
	}
	mustClean(t, f.s)
}

// TestPruneVersions: old versions go, the head, the newest and the pinned stay,
// and gc then frees the layers only the pruned versions used.
func TestPruneVersions(t *testing.T) {
	f := newFixture(t)
	ctx := context.Background()
	if _, err := f.s.CreateDesktop(ctx, "d", DesktopSpec{Base: "os2:1"}); err != nil {
		t.Fatal(err)
	}
	// v2 on the app, v3 on its base, v4 back on the second base (where the
	// desktop's top stands): v4 is the head.
	_, err := f.s.UpdateDesktop(nil, "d", func(d *Desktop) error {
		d.Versions = append(d.Versions, Version{N: 2, System: f.app.ID}, Version{N: 3, System: f.base.ID}, Version{N: 4, System: f.base2.ID})
		d.Head = 4
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	ns := func(vs []Version) []int {
		var out []int
		for _, v := range vs {
			out = append(out, v.N)
		}
		return out
	}
	tests := []struct {
		name   string
		keep   int
		pinned []int
		gone   []int
	}{
		{"keep 1", 1, nil, []int{1, 2, 3}},
		{"keep 2", 2, nil, []int{1, 2}},
		{"pinned", 1, []int{2}, []int{1, 3}},
		{"keep more than there are", 9, nil, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			gone, err := f.s.PruneVersions("d", tt.keep, true, tt.pinned...)
			if err != nil || fmt.Sprint(ns(gone)) != fmt.Sprint(tt.gone) {
				t.Errorf("dry run: %v %v, want %v", ns(gone), err, tt.gone)
			}
		})
	}
	if d, _ := f.s.Desktop("d"); len(d.Versions) != 4 {
		t.Fatalf("a dry run changed the versions: %v", ns(d.Versions))
	}
	// Without names the old layers are kept by the versions alone.
	for _, n := range []string{"os:1", "office:1"} {
		if err := f.s.Untag(n); err != nil {
			t.Fatal(err)
		}
	}
	if rep, _ := f.s.GC(ctx, true); len(rep.Removed) != 0 {
		t.Fatalf("gc before the prune would remove %v", rep.Removed)
	}
	gone, err := f.s.PruneVersions("d", 1, false)
	if err != nil || fmt.Sprint(ns(gone)) != "[1 2 3]" {
		t.Fatalf("prune: %v %v", ns(gone), err)
	}
	d, _ := f.s.Desktop("d")
	if d.Head != 4 || fmt.Sprint(ns(d.Versions)) != "[4]" {
		t.Fatalf("after the prune: head %d, versions %v", d.Head, ns(d.Versions))
	}
	rep, err := f.s.GC(ctx, false)
	if err != nil {
		t.Fatal(err)
	}
	if len(rep.Removed) != 2 {
		t.Errorf("gc after the prune removed %v, want the app and its base", rep.Removed)
	}
	mustClean(t, f.s)
}
