package desktop

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"testing"

	"github.com/cvd-project/cvd/disk"
	"github.com/cvd-project/cvd/images"
	"github.com/cvd-project/cvd/internal/labtest"
	"github.com/cvd-project/cvd/internal/testutil"
	"github.com/cvd-project/cvd/overlay"
)

// storeLab is a lab with a store in it.
type storeLab struct {
	*labtest.Lab
	st *images.Store
}

func newStoreLab(t *testing.T, s uint64) *storeLab {
	t.Helper()
	l := labtest.New(t, s)
	st, err := images.Open(filepath.Join(l.Dir, "store"), images.OpenOptions{Catalog: testutil.Catalog(t)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	return &storeLab{Lab: l, st: st}
}

// layer imports the layer the file at path holds, on parent ("" for a base).
func (s *storeLab) layer(path string, kind images.Kind, parent, name string) *images.Layer {
	s.T.Helper()
	l, _, err := s.st.Import(context.Background(), path, images.ImportOptions{Kind: kind, Parent: parent, Names: []string{name}})
	if err != nil {
		s.T.Fatalf("import %s: %v", path, err)
	}
	return l
}

// appOn makes an app layer on the store layer parent with ops random changes.
func (s *storeLab) appOn(parent *images.Layer, name string, ops int) *images.Layer {
	s.T.Helper()
	p := s.Create(name, s.st.LayerPath(parent.ID), 0, 64<<10)
	s.Scribble(p, ops)
	return s.layer(p, images.KindApp, parent.ID, name)
}

// fixture: a base, app:1 and app:2 on it, and n desktops on app:1 with random
// deltas.
func (s *storeLab) fixture(n int, size int64) (base, app1, app2 *images.Layer, desks []string) {
	s.T.Helper()
	bp := s.Create("base", "", size, 64<<10)
	s.Scribble(bp, 30)
	base = s.layer(bp, images.KindBase, "", "base:1")
	app1 = s.appOn(base, "app:1", 8)
	app2 = s.appOn(base, "app:2", 8)
	for i := range n {
		name := fmt.Sprintf("d%02d", i)
		d, err := s.st.CreateDesktop(context.Background(), name, images.DesktopSpec{Apps: []string{app1.ID}})
		if err != nil {
			s.T.Fatal(err)
		}
		if ops := s.Rng.IntN(6); ops > 0 {
			s.Scribble(s.st.Path(d.SystemDisk), ops)
		}
		desks = append(desks, name)
	}
	return
}

// bruteConflicts: clusters (size g) where the old and new lower chains read
// differently and one of own allocates something.
func bruteConflicts(t testing.TB, oldL, newL disk.Image, own []disk.Image, g int64) []overlay.Range {
	t.Helper()
	end := max(oldL.Size(), newL.Size())
	bo, bn := make([]byte, g), make([]byte, g)
	var out overlay.RangeSet
	for off := int64(0); off < end; off += g {
		k := min(g, end-off)
		held := false
		for _, l := range own {
			if off >= l.Size() {
				continue
			}
			exts, err := l.MapLayer(off, min(k, l.Size()-off))
			if err != nil {
				t.Fatal(err)
			}
			for _, e := range exts {
				held = held || e.State != disk.Unallocated
			}
		}
		if !held {
			continue
		}
		if err := disk.ReadView(oldL, bo[:k], off); err != nil {
			t.Fatal(err)
		}
		if err := disk.ReadView(newL, bn[:k], off); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(bo[:k], bn[:k]) {
			out.Add(off, k)
		}
	}
	return out.Normalize()
}

func TestRecomposeConflictSetAgainstBruteForce(t *testing.T) {
	testutil.NeedQemu(t)
	s := labtest.Seed(t)
	ctx := context.Background()
	for it := range 6 {
		t.Run(fmt.Sprint(it), func(t *testing.T) {
			sl := newStoreLab(t, s+uint64(it))
			_, app1, app2, desks := sl.fixture(5, 16<<20)
			rep, err := Recompose(ctx, sl.st, RecomposeSpec{Using: app1.ID, Apps: []string{app2.ID}, DryRun: true})
			if err != nil {
				t.Fatal(err)
			}
			if len(rep.Desktops) != len(desks) || rep.LowerDiffs != 1 {
				t.Fatalf("planned %d desktops with %d lower diffs, want %d and 1", len(rep.Desktops), rep.LowerDiffs, len(desks))
			}
			oldL := sl.Open(sl.st.LayerPath(app1.ID), true)
			newL := sl.Open(sl.st.LayerPath(app2.ID), true)
			for _, p := range rep.Desktops {
				d, err := sl.st.Desktop(p.Desktop)
				if err != nil {
					t.Fatal(err)
				}
				top := sl.Open(sl.st.Path(d.SystemDisk), true)
				want := bruteConflicts(t, oldL, newL, []disk.Image{top}, p.Granularity)
				if !slices.Equal(p.Conflicts, want) && !(len(want) == 0 && len(p.Conflicts) == 0) {
					t.Fatalf("%s: conflicts %v, want %v", p.Desktop, p.Conflicts, want)
				}
				wantAction := ActionMove
				if len(want) > 0 {
					wantAction = ActionConflict
				}
				if p.Action != wantAction || p.Applied {
					t.Fatalf("%s: action %s (applied %v), want %s, not applied", p.Desktop, p.Action, p.Applied, wantAction)
				}
				t.Logf("%s: %d conflicts, delta %d clusters, cost %+v", p.Desktop, p.ConflictClusters, p.DeltaClusters, p.Cost)
			}
		})
	}
}

// expectedMove is what a desktop should show after a move: its top's clusters
// over the new lower layers (a copy of the top, unsafely rebased with qemu-img,
// flattened).
func expectedMove(t *testing.T, sl *storeLab, d *images.Desktop, newLower string) string {
	t.Helper()
	cp := filepath.Join(t.TempDir(), "top.qcow2")
	testutil.Run(t, "cp", sl.st.Path(d.SystemDisk), cp)
	testutil.Run(t, "qemu-img", "rebase", "-u", "-b", sl.st.LayerPath(newLower), "-F", "qcow2", cp)
	return labtest.FlatCopy(t, cp)
}

func TestRecomposeApply(t *testing.T) {
	testutil.NeedQemu(t)
	s := labtest.Seed(t)
	ctx := context.Background()
	for _, policy := range []Policy{PolicyKeep, PolicyForce, PolicyRefresh} {
		t.Run(string(policy), func(t *testing.T) {
			sl := newStoreLab(t, s)
			_, app1, app2, desks := sl.fixture(6, 16<<20)
			before := map[string]*images.Desktop{}
			oldView := map[string]string{}
			newView := map[string]string{}
			for _, n := range desks {
				d, err := sl.st.Desktop(n)
				if err != nil {
					t.Fatal(err)
				}
				before[n] = d
				oldView[n] = labtest.FlatCopy(t, sl.st.Path(d.SystemDisk))
				newView[n] = expectedMove(t, sl, d, app2.ID)
			}
			plan, err := Recompose(ctx, sl.st, RecomposeSpec{Using: app1.ID, Apps: []string{app2.ID}, Policy: policy, DryRun: true})
			if err != nil {
				t.Fatal(err)
			}
			rep, err := Recompose(ctx, sl.st, RecomposeSpec{Using: app1.ID, Apps: []string{app2.ID}, Policy: policy})
			if err != nil {
				t.Fatal(err)
			}
			for i, p := range rep.Desktops {
				if p.Action != plan.Desktops[i].Action || p.ConflictClusters != plan.Desktops[i].ConflictClusters {
					t.Fatalf("%s: applied %s with %d conflicts, planned %s with %d", p.Desktop, p.Action, p.ConflictClusters,
						plan.Desktops[i].Action, plan.Desktops[i].ConflictClusters)
				}
				d, err := sl.st.Desktop(p.Desktop)
				if err != nil {
					t.Fatal(err)
				}
				top := sl.st.Path(d.SystemDisk)
				testutil.QemuCheck(t, top)
				switch p.Action {
				case ActionConflict:
					if d.Head != before[p.Desktop].Head || d.SystemDisk != before[p.Desktop].SystemDisk || !testutil.QemuCompare(t, top, oldView[p.Desktop]) {
						t.Fatalf("%s: a desktop with conflicts changed", p.Desktop)
					}
				case ActionMove, ActionRefresh:
					if !p.Applied || d.Head != before[p.Desktop].Head+1 || d.HeadVersion().System != app2.ID {
						t.Fatalf("%s: not switched: %+v", p.Desktop, d)
					}
					if _, err := os.Stat(sl.st.Path(before[p.Desktop].SystemDisk)); err == nil {
						t.Errorf("%s: the old top is still there", p.Desktop)
					}
					want := newView[p.Desktop]
					if p.Action == ActionRefresh {
						want = sl.st.LayerPath(app2.ID)
					}
					if !testutil.QemuCompare(t, top, want) {
						t.Fatalf("%s: the new chain does not show the delta over the new layers", p.Desktop)
					}
				default:
					t.Fatalf("%s: action %s", p.Desktop, p.Action)
				}
			}
			checkStore(t, sl.st)
		})
	}
}

// checkStore: the store's check is clean and every layer verifies.
func checkStore(t *testing.T, st *images.Store) {
	t.Helper()
	rep, err := st.Check(context.Background(), images.CheckOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if !rep.OK() {
		t.Fatalf("store check: %v", rep.Problems)
	}
	res, err := st.Verify(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range res {
		if !r.OK {
			t.Fatalf("layer %s does not verify: %v", r.ID, r.Problems)
		}
	}
}

// versionsFixture: a desktop on app → v1 → v2 → v3 (version layers), with data in
// its top.
func versionsFixture(t *testing.T, sl *storeLab) (app *images.Layer, vs []*images.Layer, name string) {
	t.Helper()
	bp := sl.Create("base", "", 8<<20, 64<<10)
	sl.Scribble(bp, 10)
	base := sl.layer(bp, images.KindBase, "", "base:1")
	app = sl.appOn(base, "app:1", 6)
	parent := app
	for i := range 3 {
		p := sl.Create(fmt.Sprintf("v%d", i+1), sl.st.LayerPath(parent.ID), 0, 64<<10)
		sl.Scribble(p, 6)
		parent = sl.layer(p, images.KindVersion, parent.ID, fmt.Sprintf("v:%d", i+1))
		vs = append(vs, parent)
	}
	d, err := sl.st.CreateDesktop(context.Background(), "vd", images.DesktopSpec{Apps: []string{app.ID, vs[0].ID, vs[1].ID, vs[2].ID}})
	if err != nil {
		t.Fatal(err)
	}
	sl.Scribble(sl.st.Path(d.SystemDisk), 5)
	return app, vs, "vd"
}

func TestSquashPlan(t *testing.T) {
	testutil.NeedQemu(t)
	sl := newStoreLab(t, labtest.Seed(t))
	_, vs, name := versionsFixture(t, sl)
	rep, err := Squash(context.Background(), sl.st, name, SquashOptions{Keep: 1, DryRun: true})
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(rep.Kept, []string{vs[2].ID}) || !slices.Equal(rep.Merged, []string{vs[1].ID, vs[0].ID}) || rep.Applied {
		t.Fatalf("plan %+v", rep)
	}
	rep, err = Squash(context.Background(), sl.st, name, SquashOptions{Keep: 2, DryRun: true})
	if err != nil || rep.Note == "" {
		t.Fatalf("keep 2 of 3: %+v %v", rep, err)
	}
}

func TestSquashApply(t *testing.T) {
	testutil.NeedQemu(t)
	sl := newStoreLab(t, labtest.Seed(t))
	app, vs, name := versionsFixture(t, sl)
	d, _ := sl.st.Desktop(name)
	view := labtest.FlatCopy(t, sl.st.Path(d.SystemDisk))
	for _, keep := range []int{1, 0} {
		rep, err := Squash(context.Background(), sl.st, name, SquashOptions{Keep: keep})
		if err != nil {
			t.Fatal(err)
		}
		d, _ := sl.st.Desktop(name)
		top := sl.st.Path(d.SystemDisk)
		if !rep.Applied || !testutil.QemuCompare(t, top, view) {
			t.Fatalf("keep %d: the desktop's view changed: %+v", keep, rep)
		}
		chain, err := sl.st.Chain(d.HeadVersion().System)
		if err != nil {
			t.Fatal(err)
		}
		if len(chain) != 2+1+keep || chain[1+keep].ID != app.ID {
			t.Fatalf("keep %d: chain %d layers", keep, len(chain))
		}
		testutil.QemuCheck(t, top)
	}
	for _, v := range vs {
		if _, err := sl.st.Layer(v.ID); err != nil {
			t.Fatalf("squash removed sealed layer %s: %v", v.ID, err)
		}
	}
	checkStore(t, sl.st)
}

// TestBuildNewChains checks the chains recompose and squash build beside the old
// ones (without switching the desktops): what they show, that they check clean,
// and that aborting leaves the store clean.
func TestBuildNewChains(t *testing.T) {
	testutil.NeedQemu(t)
	ctx := context.Background()
	sl := newStoreLab(t, labtest.Seed(t))
	app, vs, name := versionsFixture(t, sl)
	app2 := sl.appOn(&images.Layer{ID: app.Parent}, "app:2", 6)
	d, err := sl.st.Desktop(name)
	if err != nil {
		t.Fatal(err)
	}
	view := labtest.FlatCopy(t, sl.st.Path(d.SystemDisk))

	// Recompose (move): the versions merged onto app:2, the top copied on that.
	want := func() string { // qemu-img: copies of the own layers, unsafely rebased
		below := sl.st.LayerPath(app2.ID)
		for _, v := range vs {
			cp := filepath.Join(t.TempDir(), "v.qcow2")
			testutil.Run(t, "cp", sl.st.LayerPath(v.ID), cp)
			os.Chmod(cp, 0o644)
			testutil.Run(t, "qemu-img", "rebase", "-u", "-b", below, "-F", "qcow2", cp)
			below = cp
		}
		cp := filepath.Join(t.TempDir(), "top.qcow2")
		testutil.Run(t, "cp", sl.st.Path(d.SystemDisk), cp)
		testutil.Run(t, "qemu-img", "rebase", "-u", "-b", below, "-F", "qcow2", cp)
		return labtest.FlatCopy(t, cp)
	}()
	b, err := build(ctx, sl.st, d, app2.ID, false)
	if err != nil {
		t.Fatal(err)
	}
	top := sl.st.Path(b.topRel)
	chain, err := sl.st.Chain(b.system)
	if err != nil {
		t.Fatal(err)
	}
	if len(chain) != 3 || chain[0].Kind != images.KindVersion || chain[1].ID != app2.ID {
		t.Fatalf("new chain: %d layers", len(chain))
	}
	testutil.QemuCheck(t, top)
	if !testutil.QemuCompare(t, top, want) {
		t.Fatal("the new chain does not show the delta over app:2")
	}
	if err := b.p.Abort(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(top); err == nil {
		t.Fatal("abort left the new top")
	}

	// Refresh: an empty top on app:2.
	b, err = build(ctx, sl.st, d, app2.ID, true)
	if err != nil {
		t.Fatal(err)
	}
	if !testutil.QemuCompare(t, sl.st.Path(b.topRel), sl.st.LayerPath(app2.ID)) {
		t.Fatal("refresh does not show app:2")
	}
	b.p.Abort()

	// Squash, keeping 1 and 0 versions: the same view on a shorter chain.
	for _, k := range []int{1, 0} {
		dc, err := openDesktopChain(sl.st, d)
		if err != nil {
			t.Fatal(err)
		}
		b, merge, remade, err := buildSquash(ctx, sl.st, d, dc, k)
		dc.Close()
		if err != nil {
			t.Fatal(err)
		}
		chain, _ := sl.st.Chain(b.system)
		if len(chain) != 3+k || len(remade) != k || (k == 0 && b.system != merge) {
			t.Fatalf("keep %d: chain of %d layers", k, len(chain))
		}
		testutil.QemuCheck(t, sl.st.Path(b.topRel))
		if !testutil.QemuCompare(t, sl.st.Path(b.topRel), view) {
			t.Fatalf("keep %d: the squashed chain shows something else", k)
		}
		b.p.Abort()
	}
	checkStore(t, sl.st)
	// The sealed layers were only read.
	for _, v := range vs {
		if res, err := sl.st.Verify(ctx, v.ID); err != nil || !res[0].OK {
			t.Fatalf("layer %s: %v %v", v.ID, res, err)
		}
	}
}

func TestSquashHistory(t *testing.T) {
	d := &images.Desktop{Head: 4, Versions: []images.Version{
		{N: 1, System: "app"}, {N: 2, System: "v1"}, {N: 3, System: "v2"}, {N: 4, System: "v3"},
	}}
	dropped, remapped := squashHistory(d, []string{"v2", "v1"}, []string{"v3"}, []string{"v3'"}, "M")
	if !slices.Equal(dropped, []int{2}) || remapped[3] != "M" || remapped[4] != "v3'" || len(remapped) != 2 {
		t.Fatalf("dropped %v, remapped %v", dropped, remapped)
	}
	var got []string
	for _, v := range d.Versions {
		got = append(got, fmt.Sprintf("%d:%s", v.N, v.System))
	}
	if !slices.Equal(got, []string{"1:app", "3:M", "4:v3'"}) {
		t.Fatalf("versions %v", got)
	}
	// A dry run lists the same without changing the record.
	d2 := &images.Desktop{Head: 4, Versions: []images.Version{{N: 1, System: "app"}, {N: 2, System: "v1"}, {N: 4, System: "v3"}}}
	dropped, _ = squashHistory(d2, []string{"v2", "v1"}, []string{"v3"}, nil, "")
	if !slices.Equal(dropped, []int{2}) || len(d2.Versions) != 3 {
		t.Fatalf("dry run: dropped %v, versions %v", dropped, d2.Versions)
	}
}

// TestRecomposeMarksInUseAndApplySwitch: desktops in use are not moved but marked;
// the mark keeps the new layer from gc; ApplySwitch later moves them exactly as
// a recompose would have, and clears the mark.
func TestRecomposeMarksInUseAndApplySwitch(t *testing.T) {
	testutil.NeedQemu(t)
	ctx := context.Background()
	sl := newStoreLab(t, labtest.Seed(t))
	_, app1, app2, desks := sl.fixture(3, 16<<20)
	inUse := func(*images.Desktop) (bool, error) { return true, nil }
	before := map[string]*images.Desktop{}
	newView := map[string]string{}
	for _, n := range desks {
		d, err := sl.st.Desktop(n)
		if err != nil {
			t.Fatal(err)
		}
		before[n] = d
		newView[n] = expectedMove(t, sl, d, app2.ID)
	}
	rep, err := Recompose(ctx, sl.st, RecomposeSpec{Using: app1.ID, Apps: []string{app2.ID}, Policy: PolicyForce, InUse: inUse})
	if err != nil {
		t.Fatal(err)
	}
	if rep.Marked != len(desks) {
		t.Fatalf("marked %d of %d: %+v", rep.Marked, len(desks), rep)
	}
	for _, n := range desks {
		d, _ := sl.st.Desktop(n)
		if d.Switch == nil || d.Switch.System != app2.ID || d.Switch.Policy != string(PolicyForce) {
			t.Fatalf("%s: mark %+v", n, d.Switch)
		}
		if d.Head != before[n].Head || d.SystemDisk != before[n].SystemDisk {
			t.Fatalf("%s: a desktop in use was moved", n)
		}
	}
	checkStore(t, sl.st)
	for _, n := range desks {
		p, err := ApplySwitch(ctx, sl.st, n)
		if err != nil {
			t.Fatal(err)
		}
		if p == nil || !p.Applied {
			t.Fatalf("%s: switch not applied: %+v", n, p)
		}
		d, _ := sl.st.Desktop(n)
		if d.Switch != nil || d.HeadVersion().System != app2.ID {
			t.Fatalf("%s: after ApplySwitch: %+v", n, d)
		}
		if !testutil.QemuCompare(t, sl.st.Path(d.SystemDisk), newView[n]) {
			t.Fatalf("%s: the switched chain does not show the delta over the new layers", n)
		}
		if p, err := ApplySwitch(ctx, sl.st, n); err != nil || p != nil {
			t.Fatalf("%s: second ApplySwitch: %+v %v", n, p, err)
		}
	}
	checkStore(t, sl.st)
}

// TestPrune: old versions go, the head, the newest and the pinned stay, and gc
// then frees the layers only the pruned versions used.
func TestPrune(t *testing.T) {
	testutil.NeedQemu(t)
	sl := newStoreLab(t, labtest.Seed(t))
	ctx := context.Background()
	bp := sl.Create("base", "", 32<<20, 64<<10)
	sl.Scribble(bp, 5)
	base := sl.layer(bp, images.KindBase, "", "os:1")
	// The app's source stands on the base's source (gc removes store layers).
	ap := sl.Create("app", bp, 0, 64<<10)
	sl.Scribble(ap, 3)
	app := sl.layer(ap, images.KindApp, base.ID, "office:1")
	b2 := sl.Create("base2", "", 32<<20, 64<<10)
	sl.Scribble(b2, 5)
	base2 := sl.layer(b2, images.KindBase, "", "os2:1")
	if _, err := sl.st.CreateDesktop(ctx, "d", images.DesktopSpec{Base: "os2:1"}); err != nil {
		t.Fatal(err)
	}
	// v2 on the app, v3 on its base, v4 back on the second base (where the
	// desktop's top stands): v4 is the head.
	for _, l := range []*images.Layer{app, base, base2} {
		if _, _, err := AddVersion(sl.st, "d", images.Version{System: l.ID}, true, 0); err != nil {
			t.Fatal(err)
		}
	}
	ns := func(vs []images.Version) []int {
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
			gone, err := Prune(sl.st, "d", tt.keep, true, tt.pinned...)
			if err != nil || fmt.Sprint(ns(gone)) != fmt.Sprint(tt.gone) {
				t.Errorf("dry run: %v %v, want %v", ns(gone), err, tt.gone)
			}
		})
	}
	if d, _ := sl.st.Desktop("d"); len(d.Versions) != 4 {
		t.Fatalf("a dry run changed the versions: %v", ns(d.Versions))
	}
	// Without names the old layers are kept by the versions alone.
	for _, n := range []string{"os:1", "office:1"} {
		if err := sl.st.Untag(n); err != nil {
			t.Fatal(err)
		}
	}
	if rep, _ := sl.st.GC(ctx, true); len(rep.Removed) != 0 {
		t.Fatalf("gc before the prune would remove %v", rep.Removed)
	}
	gone, err := Prune(sl.st, "d", 1, false)
	if err != nil || fmt.Sprint(ns(gone)) != "[1 2 3]" {
		t.Fatalf("prune: %v %v", ns(gone), err)
	}
	d, _ := sl.st.Desktop("d")
	if d.Head != 4 || fmt.Sprint(ns(d.Versions)) != "[4]" {
		t.Fatalf("after the prune: head %d, versions %v", d.Head, ns(d.Versions))
	}
	rep, err := sl.st.GC(ctx, false)
	if err != nil {
		t.Fatal(err)
	}
	if len(rep.Removed) != 2 {
		t.Errorf("gc after the prune removed %v, want the app and its base", rep.Removed)
	}
}
