package images

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/cvd-project/cvd/catalog"
	"github.com/cvd-project/cvd/internal/testutil"
)

// fixture is a store with base ← app ← (desktop "d1") and an unrelated base2.
type fixture struct {
	s                *Store
	base, app, base2 *Layer
}

func newFixture(t *testing.T) *fixture {
	t.Helper()
	testutil.NeedQemu(t)
	dir := t.TempDir()
	s := openStore(t)
	bp := makeImage(t, filepath.Join(dir, "base.qcow2"), "32M", "", "write -P 0x11 0 2M")
	f := &fixture{s: s}
	f.base = importT(t, s, bp, ImportOptions{Names: []string{"os:1"}})
	f.app = importT(t, s, makeImage(t, filepath.Join(dir, "app.qcow2"), "", bp, "write -P 0x22 1M 1M"),
		ImportOptions{Parent: "os:1", Names: []string{"office:1"}})
	f.base2 = importT(t, s, makeImage(t, filepath.Join(dir, "base2.qcow2"), "32M", "", "write -P 0x33 0 1M"), ImportOptions{Names: []string{"os2:1"}})
	return f
}

func TestDesktopCreate(t *testing.T) {
	f := newFixture(t)
	ctx := context.Background()
	tests := []struct {
		name string
		spec DesktopSpec
		err  error
	}{
		{"base and app", DesktopSpec{Base: "os:1", Apps: []string{"office:1"}}, nil},
		{"apps only", DesktopSpec{Apps: []string{"office:1"}}, nil},
		{"base only with blank user disk", DesktopSpec{Base: "os2:1", UserSize: 8 << 20}, nil},
		{"user disk on a layer", DesktopSpec{Base: "os:1", User: "os2:1"}, nil},
		{"app on another base", DesktopSpec{Base: "os2:1", Apps: []string{"office:1"}}, ErrNoParent},
		{"app as base", DesktopSpec{Base: "office:1"}, ErrInvalid},
		{"nothing", DesktopSpec{}, ErrInvalid},
		{"unknown layer", DesktopSpec{Base: "nope:1"}, ErrNotFound},
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			name := "d" + string(rune('a'+i))
			d, err := f.s.CreateDesktop(ctx, name, tt.spec)
			if tt.err != nil {
				if !errors.Is(err, tt.err) {
					t.Fatalf("err = %v, want %v", err, tt.err)
				}
				if _, err := os.Stat(f.s.Path(DesktopsDir + "/" + name + ".system.qcow2")); err == nil {
					t.Error("a refused desktop left its top behind")
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			v := d.HeadVersion()
			if d.Head != 1 || v == nil || v.N != 1 {
				t.Fatalf("versions %+v head %d", d.Versions, d.Head)
			}
			top := f.s.Path(d.SystemDisk)
			chain := qimg(t, "info", "--backing-chain", top)
			want := 2
			if v.System == f.app.ID {
				want = 3
			}
			if n := strings.Count(chain, "\nfile format: qcow2"); n != want {
				t.Errorf("chain has %d qcow2 layers, want %d:\n%s", n, want, chain)
			}
			if !testutil.QemuCompare(t, top, f.s.LayerPath(v.System)) {
				t.Error("the desktop's top reads differently from its layer")
			}
			if (tt.spec.UserSize > 0 || tt.spec.User != "") != (d.UserDisk != "") {
				t.Errorf("user disk %q", d.UserDisk)
			}
			if d.UserDisk != "" {
				qimg(t, "info", f.s.Path(d.UserDisk))
			}
		})
	}
	if _, err := f.s.CreateDesktop(ctx, "da", DesktopSpec{Base: "os:1"}); !errors.Is(err, ErrExists) {
		t.Errorf("duplicate desktop: %v", err)
	}
	if _, err := f.s.CreateDesktop(ctx, "bad/name", DesktopSpec{Base: "os:1"}); !errors.Is(err, ErrInvalid) {
		t.Errorf("bad name: %v", err)
	}
	ds, _ := f.s.Desktops()
	if len(ds) != 4 {
		t.Errorf("%d desktops", len(ds))
	}
	mustClean(t, f.s)
}

func addClone(t *testing.T, s *Store, name, mac string, src *CloneSource) {
	t.Helper()
	sys, _, _ := CloneFiles(name)
	p, err := s.Begin("clone", []string{sys})
	if err != nil {
		t.Fatal(err)
	}
	if err := s.createTop(sys, src.Layer, 0); err != nil {
		t.Fatal(err)
	}
	err = s.CommitClones(p, []Clone{{Name: name, MAC: mac, UUID: "u-" + name, Hostname: name,
		Desktop: src.Desktop, Version: src.Version, Layer: src.Layer, Disk: sys}})
	if err != nil {
		p.Abort()
		t.Fatal(err)
	}
}

func TestRemoveRefusedWithDependents(t *testing.T) {
	f := newFixture(t)
	ctx := context.Background()
	if _, err := f.s.CreateDesktop(ctx, "desk", DesktopSpec{Base: "os:1", Apps: []string{"office:1"}}); err != nil {
		t.Fatal(err)
	}
	src, err := f.s.ResolveCloneSource("os2:1")
	if err != nil {
		t.Fatal(err)
	}
	addClone(t, f.s, "c1", "02:00:00:00:00:01", src)

	tests := []struct {
		name string
		ref  string
		want []Dependent // nil: removal allowed
	}{
		{"base under app and desktop", "os:1", []Dependent{{"layer", f.app.ID}, {"desktop", "desk"}}},
		{"app under desktop", "office:1", []Dependent{{"desktop", "desk"}}},
		{"base under a clone", "os2:1", []Dependent{{"clone", "c1"}}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := f.s.RemoveLayer(tt.ref)
			var de *DependentsError
			if !errors.As(err, &de) || !errors.Is(err, ErrHasDependents) {
				t.Fatalf("RemoveLayer(%s) = %v, want a DependentsError", tt.ref, err)
			}
			for _, w := range tt.want {
				if !slices.Contains(de.Dependents, w) {
					t.Errorf("dependents %v lack %v", de.Dependents, w)
				}
				if !strings.Contains(err.Error(), w.String()) {
					t.Errorf("message %q does not name %v", err, w)
				}
			}
		})
	}
	for _, l := range []*Layer{f.base, f.app, f.base2} {
		if _, err := os.Stat(f.s.LayerPath(l.ID)); err != nil {
			t.Errorf("refused removal touched %s: %v", ShortID(l.ID), err)
		}
	}
	// A desktop with clones made from it.
	dsrc, _ := f.s.ResolveCloneSource("desk")
	addClone(t, f.s, "c2", "02:00:00:00:00:02", dsrc)
	if _, _, err := f.s.RemoveDesktop("desk", false); !errors.Is(err, ErrHasDependents) || !strings.Contains(err.Error(), "clone c2") {
		t.Fatalf("desktop rm with a clone: %v", err)
	}
	// Removing clones never touches a layer.
	if _, err := f.s.RemoveClones([]string{"c1"}); err != nil {
		t.Fatal(err)
	}
	if _, _, err := f.s.RemoveDesktop("desk", true); err != nil {
		t.Fatal(err)
	}
	if _, err := f.s.Clone("c2"); !errors.Is(err, ErrNotFound) {
		t.Errorf("clone c2 after desktop rm --with-clones: %v", err)
	}
	for _, ref := range []string{"office:1", "os:1", "os2:1"} {
		if _, err := f.s.RemoveLayer(ref); err != nil {
			t.Errorf("RemoveLayer(%s) with nothing depending: %v", ref, err)
		}
	}
	if fs := layerFiles(t, f.s); len(fs) != 0 {
		t.Errorf("files left: %v", fs)
	}
	mustClean(t, f.s)
}

func TestGC(t *testing.T) {
	f := newFixture(t)
	ctx := context.Background()
	dir := t.TempDir()
	// Unnamed layers: one under a clone, one on top of nothing kept, and a chain
	// whose unnamed middle is kept by a named top.
	lone := importT(t, f.s, makeImage(t, filepath.Join(dir, "lone.qcow2"), "8M", "", "write -P 1 0 64k"), ImportOptions{})
	held := importT(t, f.s, makeImage(t, filepath.Join(dir, "held.qcow2"), "8M", "", "write -P 2 0 64k"), ImportOptions{})
	mid := importT(t, f.s, makeImage(t, filepath.Join(dir, "mid.qcow2"), "", f.s.LayerPath(f.base2.ID), "write -P 3 0 64k"), ImportOptions{})
	importT(t, f.s, makeImage(t, filepath.Join(dir, "top.qcow2"), "", f.s.LayerPath(mid.ID), "write -P 4 0 64k"), ImportOptions{Names: []string{"top:1"}})
	deadChild := importT(t, f.s, makeImage(t, filepath.Join(dir, "dc.qcow2"), "", f.s.LayerPath(lone.ID), "write -P 5 0 64k"), ImportOptions{})
	addClone(t, f.s, "c1", "02:00:00:00:00:01", &CloneSource{Layer: held.ID})
	if _, err := f.s.CreateDesktop(ctx, "desk", DesktopSpec{Base: "os:1"}); err != nil {
		t.Fatal(err)
	}
	if err := f.s.Untag("os:1"); err != nil { // kept by the desktop alone
		t.Fatal(err)
	}
	before, _ := f.s.Layers()

	dry, err := f.s.GC(ctx, true)
	if err != nil {
		t.Fatal(err)
	}
	var ids []string
	for _, l := range dry.Removed {
		ids = append(ids, l.ID)
	}
	slices.Sort(ids)
	want := []string{lone.ID, deadChild.ID}
	slices.Sort(want)
	if !slices.Equal(ids, want) {
		t.Errorf("gc --dry-run would remove %v, want %v", ids, want)
	}
	if after, _ := f.s.Layers(); len(after) != len(before) {
		t.Fatal("dry run removed layers")
	}
	rep, err := f.s.GC(ctx, false)
	if err != nil {
		t.Fatal(err)
	}
	if len(rep.Removed) != 2 || rep.Kept != len(before)-2 || rep.Bytes <= 0 {
		t.Errorf("gc report %+v", rep)
	}
	for _, l := range []*Layer{lone, deadChild} {
		if _, err := os.Stat(f.s.LayerPath(l.ID)); !os.IsNotExist(err) {
			t.Errorf("gc left %s: %v", ShortID(l.ID), err)
		}
	}
	after, _ := f.s.Layers()
	for _, l := range after {
		if _, err := os.Stat(f.s.LayerPath(l.ID)); err != nil {
			t.Errorf("kept layer lost its file: %v", err)
		}
	}
	if rep2, _ := f.s.GC(ctx, false); len(rep2.Removed) != 0 {
		t.Errorf("second gc removed %d", len(rep2.Removed))
	}
	mustClean(t, f.s)
}

// TestRecovery: an operation interrupted between its journal entry and its
// commit is rolled back at the next open, and a removal rolled forward.
func TestRecovery(t *testing.T) {
	f := newFixture(t)
	s := f.s
	dir := s.Dir()
	// An interrupted clone: journal written, file written, no commit.
	sys, _, _ := CloneFiles("ghost")
	if _, err := s.Begin("clone", []string{sys}); err != nil {
		t.Fatal(err)
	}
	if err := s.createTop(sys, f.base.ID, 0); err != nil {
		t.Fatal(err)
	}
	orphanJournal(t, s)
	// A temporary file of an interrupted import.
	tmp := filepath.Join(s.Path(LayersDir), TempPrefix+"x.qcow2")
	os.WriteFile(tmp, []byte("half"), 0o444)
	// A seed image's work area.
	os.MkdirAll(s.Path(ClonesDir+"/"+TempPrefix+"seed-1/sub"), 0o755)
	os.WriteFile(s.Path(ClonesDir+"/"+TempPrefix+"seed-1/sub/meta-data"), []byte("x"), 0o644)
	s.Close()

	ro, err := Open(dir, OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	rep, err := ro.Check(context.Background(), CheckOptions{})
	if err != nil {
		t.Fatal(err)
	}
	kinds := map[string]int{}
	for _, p := range rep.Problems {
		kinds[p.Kind]++
	}
	if kinds[ProblemPending] != 1 || kinds[ProblemTempFile] != 2 || kinds[ProblemStrayFile] != 1 {
		t.Errorf("read-only check before recovery: %v", rep.Problems)
	}
	ro.Close()

	s2, err := Open(dir, OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Close()
	if len(s2.Recovered()) != 2 {
		t.Errorf("recovered %q", s2.Recovered())
	}
	for _, p := range []string{s2.Path(sys), tmp} {
		if _, err := os.Stat(p); !os.IsNotExist(err) {
			t.Errorf("%s survived recovery", p)
		}
	}
	mustClean(t, s2)
	f.s = s2
}

func TestCheckFindsProblems(t *testing.T) {
	f := newFixture(t)
	s := f.s
	ctx := context.Background()
	if _, err := s.CreateDesktop(ctx, "desk", DesktopSpec{Base: "os:1"}); err != nil {
		t.Fatal(err)
	}
	mustClean(t, s)
	os.WriteFile(s.Path(ClonesDir+"/stray.qcow2"), []byte("x"), 0o644)
	os.Remove(s.Path(DesktopsDir + "/desk.system.qcow2"))
	os.Chmod(s.LayerPath(f.base2.ID), 0o644)
	rep, err := s.Check(ctx, CheckOptions{})
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]string{
		ProblemStrayFile:   "clones/stray.qcow2",
		ProblemMissingFile: "desktops/desk.system.qcow2",
		ProblemWritable:    layerRel(f.base2.ID),
	}
	got := map[string]string{}
	for _, p := range rep.Problems {
		got[p.Kind] = p.Path
	}
	for k, v := range want {
		if got[k] != v {
			t.Errorf("problem %s: got path %q, want %q (all: %v)", k, got[k], v, rep.Problems)
		}
	}
	if len(rep.Problems) != len(want) {
		t.Errorf("problems %v", rep.Problems)
	}
	os.Chmod(s.LayerPath(f.base2.ID), 0o444)
	os.Remove(s.Path(ClonesDir + "/stray.qcow2"))
	s.createTop(DesktopsDir+"/desk.system.qcow2", f.base.ID, 0)
	mustClean(t, s)
}

func TestReadOnlyStore(t *testing.T) {
	f := newFixture(t)
	dir := f.s.Dir()
	f.s.Close()
	ro, err := Open(dir, OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer ro.Close()
	if ls, err := ro.Layers(); err != nil || len(ls) != 3 {
		t.Errorf("layers %d %v", len(ls), err)
	}
	if err := ro.Tag("os:1", "x:1", false); !errors.Is(err, ErrReadOnlyStore) {
		t.Errorf("tag on a read-only store: %v", err)
	}
	if _, err := Open(filepath.Join(t.TempDir(), "none"), OpenOptions{ReadOnly: true}); err == nil {
		t.Error("read-only open of a missing store succeeded")
	}
	// A writer opens beside the reader (no lock of the whole store), and the
	// reader sees its change.
	s2, err := Open(dir, OpenOptions{})
	if err != nil {
		t.Fatalf("read-write open beside a reader: %v", err)
	}
	defer s2.Close()
	if err := s2.Tag("os:1", "x:1", false); err != nil {
		t.Fatal(err)
	}
	if _, err := ro.Resolve("x:1"); err != nil {
		t.Errorf("the reader does not see the writer's tag: %v", err)
	}
	f.s = ro
}

// TestJournalReservesFiles: a file being made by one operation, or already there,
// cannot be journaled by another (whose Abort would remove it).
func TestJournalReservesFiles(t *testing.T) {
	s := openStore(t)
	p1, err := s.Begin("clone", []string{"clones/a.qcow2", "clones/b.qcow2"})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.Begin("clone", []string{"clones/b.qcow2"}); !errors.Is(err, ErrExists) {
		t.Errorf("overlapping Begin: %v", err)
	}
	os.WriteFile(s.Path("clones/c.qcow2"), nil, 0o644)
	if _, err := s.Begin("clone", []string{"clones/c.qcow2"}); !errors.Is(err, ErrExists) {
		t.Errorf("Begin over an existing file: %v", err)
	}
	os.Remove(s.Path("clones/c.qcow2"))
	os.WriteFile(s.Path("clones/a.qcow2"), nil, 0o644)
	if err := p1.Abort(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(s.Path("clones/a.qcow2")); !os.IsNotExist(err) {
		t.Errorf("Abort left its file: %v", err)
	}
	p2, err := s.Begin("clone", []string{"clones/b.qcow2"})
	if err != nil {
		t.Fatalf("Begin after Abort: %v", err)
	}
	p2.Abort()
	mustClean(t, s)
}

// TestCatalogOfAnotherStore: a store directory refuses a catalog that holds
// another store's records, and remembers the one it was made with.
func TestCatalogOfAnotherStore(t *testing.T) {
	url := testutil.Postgres(t)
	a, err := Open(filepath.Join(t.TempDir(), "a"), OpenOptions{Catalog: url})
	if err != nil {
		t.Fatal(err)
	}
	dirA := a.Dir()
	a.Close()
	if _, err := Open(filepath.Join(t.TempDir(), "b"), OpenOptions{Catalog: url}); !errors.Is(err, ErrInvalid) {
		t.Fatalf("a second store on the first one's database: %v", err)
	}
	// Reopened without naming it, the store finds its catalog in config.json;
	// naming another is refused.
	a, err = Open(dirA, OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if a.Catalog().Engine() != catalog.Postgres {
		t.Errorf("reopened on %s", a.Catalog().Engine())
	}
	a.Close()
	if _, err := Open(dirA, OpenOptions{Catalog: filepath.Join(t.TempDir(), "other.db")}); !errors.Is(err, ErrInvalid) {
		t.Errorf("naming another catalog: %v", err)
	}
}

// TestGCLeavesLayersInUse: a layer that a process of the site reads (its layer
// lock held shared, as a server streaming it holds it), or that a keeper names
// (a check-in staging on it), survives a collection with its ancestors; once
// neither holds, the next collection removes them. Two collections never run at
// once.
func TestGCLeavesLayersInUse(t *testing.T) {
	s := openStore(t)
	ctx := context.Background()
	dir := t.TempDir()
	base := importT(t, s, makeImage(t, filepath.Join(dir, "b.qcow2"), "16M", "", "write -P 1 0 1M"), ImportOptions{})
	child := importT(t, s, makeImage(t, filepath.Join(dir, "c.qcow2"), "", filepath.Join(dir, "b.qcow2"), "write -P 2 1M 1M"), ImportOptions{Parent: base.ID})
	other := importT(t, s, makeImage(t, filepath.Join(dir, "o.qcow2"), "16M", "", "write -P 3 0 1M"), ImportOptions{})

	// Another process of the site (its own handle on the catalog) streams child.
	peer, err := Open(s.Dir(), OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer peer.Close()
	release, err := peer.Catalog().TryLock(LayerLockKey(child.ID), true)
	if err != nil {
		t.Fatal(err)
	}
	var keep []string
	keepers = append(keepers, func(*catalog.Tx) ([]string, error) { return keep, nil })
	defer func() { keepers = keepers[:len(keepers)-1] }()
	keep = []string{other.ID}

	rep, err := s.GC(ctx, false)
	if err != nil {
		t.Fatal(err)
	}
	if len(rep.Removed) != 0 {
		t.Fatalf("removed %d layers in use: %+v", len(rep.Removed), rep.Removed)
	}
	gcRel, err := peer.Catalog().TryLock("gc", false)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.GC(ctx, false); !errors.Is(err, ErrGCRunning) {
		t.Errorf("a collection beside another: %v, want ErrGCRunning", err)
	}
	gcRel()
	release()
	keep = nil
	rep, err = s.GC(ctx, false)
	if err != nil {
		t.Fatal(err)
	}
	if len(rep.Removed) != 3 {
		t.Fatalf("removed %d layers once unused, want 3", len(rep.Removed))
	}
	for _, l := range []*Layer{base, child, other} {
		if _, err := os.Stat(s.LayerPath(l.ID)); !os.IsNotExist(err) {
			t.Errorf("layer %s still on disk: %v", l.ID[:12], err)
		}
	}
}

// TestChains: the layers of several chains, each once, unknown tops skipped.
func TestChains(t *testing.T) {
	s := openStore(t)
	dir := t.TempDir()
	base := importT(t, s, makeImage(t, filepath.Join(dir, "b.qcow2"), "16M", "", "write -P 1 0 1M"), ImportOptions{})
	a := importT(t, s, makeImage(t, filepath.Join(dir, "a.qcow2"), "", filepath.Join(dir, "b.qcow2"), "write -P 2 1M 1M"), ImportOptions{Parent: base.ID})
	b := importT(t, s, makeImage(t, filepath.Join(dir, "c.qcow2"), "", filepath.Join(dir, "b.qcow2"), "write -P 3 2M 1M"), ImportOptions{Parent: base.ID})
	for _, c := range []struct {
		tops []string
		want []string
	}{
		{[]string{a.ID}, []string{a.ID, base.ID}},
		{[]string{a.ID, b.ID, "", strings.Repeat("0", 64)}, []string{a.ID, b.ID, base.ID}},
		{nil, nil},
	} {
		got, err := s.Chains(c.tops)
		if err != nil {
			t.Fatal(err)
		}
		var ids []string
		for id, l := range got {
			if l.ID != id {
				t.Errorf("layer %s under key %s", l.ID, id)
			}
			ids = append(ids, id)
		}
		slices.Sort(ids)
		want := slices.Sorted(slices.Values(c.want))
		if !slices.Equal(ids, want) {
			t.Errorf("Chains(%d tops) = %d layers, want %d", len(c.tops), len(ids), len(want))
		}
	}
}
