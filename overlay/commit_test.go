package overlay

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"github.com/cvd-project/cvd/disk"
	"github.com/cvd-project/cvd/internal/labtest"
	"github.com/cvd-project/cvd/internal/testutil"
)

// countDiffering counts, by brute force, the clusters of size g of [0, size) where
// a and b read differently.
func countDiffering(t testing.TB, a, b disk.Image, size, g int64) int64 {
	t.Helper()
	ba, bb := make([]byte, g), make([]byte, g)
	var n int64
	for off := int64(0); off < size; off += g {
		k := min(g, size-off)
		if err := disk.ReadView(a, ba[:k], off); err != nil {
			t.Fatal(err)
		}
		if err := disk.ReadView(b, bb[:k], off); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(ba[:k], bb[:k]) {
			n++
		}
	}
	return n
}

func TestCommitRandom(t *testing.T) {
	testutil.NeedQemu(t)
	shrinkPipeline(t)
	s := labtest.Seed(t)
	ctx := context.Background()
	for it := range 16 {
		t.Run(fmt.Sprint(it), func(t *testing.T) {
			l := labtest.New(t, s+uint64(it))
			nodes := randomTree(l, 3+l.Rng.IntN(6))
			top := l.Create("top", nodes[l.Rng.IntN(len(nodes))], 0, []int{64 << 10, 16 << 10}[l.Rng.IntN(2)])
			l.Scribble(top, 1+l.Rng.IntN(15))

			ti := l.Open(top, true)
			layers := disk.Layers(ti)
			k := 1 + l.Rng.IntN(len(layers)-1)
			target := layers[k].Info().Path
			sealed := l.Rng.IntN(2) == 0
			if sealed {
				if err := os.Chmod(target, 0o444); err != nil {
					t.Fatal(err)
				}
			}
			g := int64(layers[k].Info().ClusterSize)
			if sealed {
				g = int64(ti.Info().ClusterSize)
			}
			var want int64
			if sealed || layers[k].Size() >= ti.Size() {
				want = countDiffering(t, ti, layers[k], ti.Size(), g)
			}
			ti.Close()
			flat := labtest.FlatCopy(t, top)
			before := sums(t, l.Dir)

			out := filepath.Join(l.Dir, "committed.qcow2")
			rep, err := Commit(ctx, top, CommitOptions{Into: target, Output: out, AllowedRoots: []string{l.Dir}})
			if !sealed && layers[k].Size() < layers[0].Size() {
				if err == nil {
					t.Fatal("commit into a smaller writable target succeeded")
				}
				return
			}
			if err != nil {
				t.Fatalf("commit %s into %s (sealed %v): %v", top, target, sealed, err)
			}
			t.Logf("%+v", *rep)
			if sealed {
				testutil.CheckOnCleanup(t, out)
			}
			if rep.Copied+rep.Zeroed != want {
				t.Errorf("wrote %d clusters, want the %d that differ", rep.Copied+rep.Zeroed, want)
			}
			if !testutil.QemuCompare(t, top, flat) {
				t.Fatal("the guest view of the top changed")
			}
			after := sums(t, l.Dir)
			for name, sum := range before {
				changedOK := name == filepath.Base(top) || (!sealed && name == filepath.Base(target))
				if !changedOK && after[name] != sum {
					t.Errorf("%s changed", name)
				}
			}
			img := l.Open(top, true)
			exts, err := img.MapLayer(0, img.Size())
			if err != nil {
				t.Fatal(err)
			}
			if len(exts) != 1 || exts[0].State != disk.Unallocated {
				t.Fatalf("top not empty after commit: %v", exts)
			}
			wantBacking := target
			if sealed {
				wantBacking = out
			}
			if !layerKey(img.Backing()).same(pathKey(wantBacking)) {
				t.Fatalf("top stands on %s, want %s", img.Backing().Info().Path, wantBacking)
			}
		})
	}
}

func TestFlatten(t *testing.T) {
	testutil.NeedQemu(t)
	s := labtest.Seed(t)
	l := labtest.New(t, s)
	nodes := randomTree(l, 6)
	src := l.Open(nodes[len(nodes)-1], true)
	for _, tc := range []struct {
		name string
		opts disk.ConvertOptions
	}{
		{"qcow2", disk.ConvertOptions{}},
		{"raw", disk.ConvertOptions{Format: disk.FormatRaw}},
		{"zstd", disk.ConvertOptions{Compress: "zstd"}},
		{"deflate", disk.ConvertOptions{Compress: "deflate"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			out := filepath.Join(l.Dir, "flat-"+tc.name)
			rep, err := Flatten(context.Background(), src, out, tc.opts)
			if err != nil {
				t.Fatal(err)
			}
			if tc.opts.Format != disk.FormatRaw {
				testutil.QemuCheck(t, out)
			}
			if !testutil.QemuCompare(t, nodes[len(nodes)-1], out) {
				t.Fatalf("flattened %s differs", tc.name)
			}
			if rep.Layers != len(disk.Layers(src)) || rep.FileSize == 0 {
				t.Fatalf("report %+v", *rep)
			}
			if _, err := Flatten(context.Background(), src, out, tc.opts); err == nil {
				t.Fatal("flatten over an existing file succeeded")
			}
		})
	}
}
