package overlay

import (
	"context"
	"fmt"
	"path/filepath"
	"slices"
	"testing"

	"github.com/cvd-project/cvd/internal/labtest"
	"github.com/cvd-project/cvd/internal/testutil"
)

// shrinkPipeline makes windows and chunks small so that small test disks cross
// their boundaries.
func shrinkPipeline(t testing.TB) {
	w, c := windowSize, chunkSize
	windowSize, chunkSize = 1<<20, 128<<10
	t.Cleanup(func() { windowSize, chunkSize = w, c })
}

// randomTree makes a tree of images: bases with random content and overlays on
// random earlier images, some with other virtual sizes or cluster sizes.
func randomTree(l *labtest.Lab, n int) []string {
	l.T.Helper()
	r := l.Rng
	sizes := []int64{3 << 20, 4 << 20, 4<<20 + 512*int64(1+r.IntN(100))}
	css := []int{64 << 10, 64 << 10, 64 << 10, 16 << 10, 4 << 10}
	var nodes []string
	for i := range n {
		if i == 0 || r.IntN(8) == 0 {
			p := l.Create("base", "", sizes[r.IntN(len(sizes))], css[r.IntN(len(css))])
			l.Scribble(p, 5+r.IntN(20))
			nodes = append(nodes, p)
			continue
		}
		parent := nodes[r.IntN(len(nodes))]
		var size int64 // the parent's
		if r.IntN(5) == 0 {
			size = sizes[r.IntN(len(sizes))]
		}
		p := l.Create(fmt.Sprintf("ov%d", i), parent, size, css[r.IntN(len(css))])
		if r.IntN(6) > 0 {
			l.Scribble(p, r.IntN(15))
		}
		nodes = append(nodes, p)
	}
	return nodes
}

func TestDiffRandomAgainstBruteForce(t *testing.T) {
	testutil.NeedQemu(t)
	shrinkPipeline(t)
	s := labtest.Seed(t)
	for it := range 20 {
		t.Run(fmt.Sprint(it), func(t *testing.T) {
			l := labtest.New(t, s+uint64(it))
			nodes := randomTree(l, 3+l.Rng.IntN(8))
			for range 4 {
				pa, pb := nodes[l.Rng.IntN(len(nodes))], nodes[l.Rng.IntN(len(nodes))]
				a, b := l.Open(pa, true), l.Open(pb, true)
				rep, err := DiffStats(context.Background(), a, b)
				if err != nil {
					t.Fatalf("diff %s %s: %v", pa, pb, err)
				}
				want := bruteDiff(t, a, b, rep.Granularity)
				t.Logf("%s vs %s: %d clusters differ, %d compared, %d shared layers", filepath.Base(pa), filepath.Base(pb), rep.Clusters, rep.Compared, rep.SharedLayers)
				if !slices.Equal(rep.Ranges, want) {
					t.Fatalf("diff %s %s (granularity %d):\n got  %v\n want %v", pa, pb, rep.Granularity, rep.Ranges, want)
				}
				if pa == pb && (len(rep.Ranges) != 0 || rep.BytesRead != 0) {
					t.Fatalf("diff of %s with itself read %d bytes: %v", pa, rep.BytesRead, rep.Ranges)
				}
			}
		})
	}
}

// TestDiffFollowsSharedAncestry: two overlays on one large base read only the
// clusters the overlays allocate, not the base.
func TestDiffFollowsSharedAncestry(t *testing.T) {
	testutil.NeedQemu(t)
	l := labtest.New(t, 1)
	base := l.Create("base", "", 64<<20, 64<<10)
	l.Scribble(base, 200)
	a := l.Create("a", base, 0, 64<<10)
	b := l.Create("b", base, 0, 64<<10)
	ia, ib := l.Open(a, false), l.Open(b, false)
	if _, err := ia.WriteAt(make([]byte, 64<<10), 1<<20); err != nil { // zeros over base data, maybe
		t.Fatal(err)
	}
	one := []byte{1}
	if _, err := ia.WriteAt(one, 5<<20); err != nil {
		t.Fatal(err)
	}
	if _, err := ib.WriteAt(one, 5<<20); err != nil { // same byte: allocated in both, equal
		t.Fatal(err)
	}
	if _, err := ib.WriteAt(one, 9<<20+3); err != nil {
		t.Fatal(err)
	}
	rep, err := DiffStats(context.Background(), ia, ib)
	if err != nil {
		t.Fatal(err)
	}
	if rep.SharedLayers != 1 || rep.Compared > 3 || rep.BytesRead > 2*3*(64<<10)*2 {
		t.Fatalf("diff did more work than the overlays hold: %+v", rep)
	}
	want := bruteDiff(t, ia, ib, rep.Granularity)
	if !slices.Equal(rep.Ranges, want) {
		t.Fatalf("got %v, want %v", rep.Ranges, want)
	}
}
