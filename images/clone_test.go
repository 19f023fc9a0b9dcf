package images

import (
	"errors"
	"os"
	"slices"
	"testing"
)

// A live checkpoint freezes a clone's top and names a new one: the record
// follows, the store check knows every file, and removing the clone removes
// the frozen tops too. Boot settings are recorded per clone.
func TestCloneCheckpointAndBoot(t *testing.T) {
	f := newFixture(t)
	s := f.s
	src, err := s.ResolveCloneSource("office:1")
	if err != nil {
		t.Fatal(err)
	}
	addClone(t, s, "c1", "02:00:00:00:00:01", src)
	addClone(t, s, "c2", "02:00:00:00:00:02", src)

	// What the hypervisor does: a new top over the old one, in the clones dir.
	newTop := func(name string, n int) string {
		t.Helper()
		c, err := s.Clone(name)
		if err != nil {
			t.Fatal(err)
		}
		f := CheckpointFile(name, n, false)
		qimg(t, "create", "-q", "-f", "qcow2", "-b", s.Path(c.Disk), "-F", "qcow2", s.Path(f))
		return f
	}
	cp1 := newTop("c1", 1)
	if cp1 != ClonesDir+"/c1.cp1.qcow2" || CheckpointFile("c1", 2, true) != ClonesDir+"/c1.user.cp2.qcow2" {
		t.Fatalf("checkpoint files: %s, %s", cp1, CheckpointFile("c1", 2, true))
	}
	c, err := s.RecordCheckpoint("c1", cp1, "")
	if err != nil {
		t.Fatal(err)
	}
	orig, _, _ := CloneFiles("c1")
	if c.Disk != cp1 || !slices.Equal(c.Checkpoints, []string{orig}) {
		t.Fatalf("after checkpoint 1: disk %s, checkpoints %v", c.Disk, c.Checkpoints)
	}
	cp2 := newTop("c1", 2)
	if _, err := s.RecordCheckpoint("c1", cp2, ""); err != nil {
		t.Fatal(err)
	}
	c, _ = s.Clone("c1")
	if want := []string{cp2, cp1, orig}; !slices.Equal(c.SystemChainFiles(), want) {
		t.Fatalf("chain files %v, want %v", c.SystemChainFiles(), want)
	}
	if c.UserChainFiles() != nil {
		t.Errorf("user chain files %v for a clone without a user disk", c.UserChainFiles())
	}
	mustClean(t, s)

	for _, tt := range []struct {
		name, clone, disk, user string
		want                    error
	}{
		{"missing clone", "nope", ClonesDir + "/nope.cp1.qcow2", "", ErrNotFound},
		{"no new top", "c2", "", "", ErrInvalid},
		{"another clone's file", "c2", cp1, "", ErrInvalid},
		{"outside the clones dir", "c2", LayersDir + "/c2.cp1.qcow2", "", ErrInvalid},
		{"already in the chain", "c1", cp1, "", ErrInvalid},
		{"no user disk", "c2", "", ClonesDir + "/c2.user.cp1.qcow2", ErrInvalid},
		{"file missing", "c2", ClonesDir + "/c2.cp1.qcow2", "", os.ErrNotExist},
	} {
		t.Run(tt.name, func(t *testing.T) {
			before, _ := s.Clone(tt.clone)
			if _, err := s.RecordCheckpoint(tt.clone, tt.disk, tt.user); !errors.Is(err, tt.want) {
				t.Fatalf("RecordCheckpoint: %v, want %v", err, tt.want)
			}
			if after, _ := s.Clone(tt.clone); before != nil && (after.Disk != before.Disk || len(after.Checkpoints) != len(before.Checkpoints)) {
				t.Errorf("record changed: %+v", after)
			}
		})
	}

	boot := &Boot{Kernel: "/k", Initrd: "/i", Cmdline: "console=ttyS0", MemoryMiB: 128, VCPUs: 1}
	if err := s.SetCloneBoot(boot, "c1", "c2"); err != nil {
		t.Fatal(err)
	}
	if err := s.SetCloneBoot(nil, "c2", "nope"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("SetCloneBoot of a missing clone: %v", err)
	}
	for _, n := range []string{"c1", "c2"} {
		if c, _ := s.Clone(n); c.Boot == nil || *c.Boot != *boot {
			t.Errorf("%s boot %+v, want %+v (a failed update changes nothing)", n, c.Boot, boot)
		}
	}

	if _, err := s.RemoveClones([]string{"c1"}); err != nil {
		t.Fatal(err)
	}
	for _, f := range []string{orig, cp1, cp2} {
		if _, err := os.Stat(s.Path(f)); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s left after clone rm: %v", f, err)
		}
	}
	mustClean(t, s)
}
