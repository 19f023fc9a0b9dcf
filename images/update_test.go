package images

import (
	"context"
	"errors"
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
