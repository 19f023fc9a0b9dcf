package overlay

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/cvd-project/cvd/disk"
	"github.com/cvd-project/cvd/internal/labtest"
	"github.com/cvd-project/cvd/internal/testutil"
)

func fileSum(t testing.TB, p string) [32]byte {
	t.Helper()
	f, err := os.Open(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		t.Fatal(err)
	}
	return [32]byte(h.Sum(nil))
}

// sums hashes every file of dir.
func sums(t testing.TB, dir string) map[string][32]byte {
	t.Helper()
	m := map[string][32]byte{}
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range ents {
		if e.Type().IsRegular() {
			m[e.Name()] = fileSum(t, filepath.Join(dir, e.Name()))
		}
	}
	return m
}

// inChain reports whether the chain of path holds the file of x.
func inChain(l *labtest.Lab, path, x string) bool {
	img, err := disk.Open(path, disk.OpenOptions{ReadOnly: true, AllowedRoots: []string{l.Dir}})
	if err != nil {
		l.T.Fatal(err)
	}
	defer img.Close()
	for _, ly := range disk.Layers(img) {
		if layerKey(ly).same(pathKey(x)) {
			return true
		}
	}
	return false
}

// expectedCopies lists, by brute force, the clusters of top (cluster size g) that
// top does not allocate and whose content differs between its old chain and nb.
func expectedCopies(t testing.TB, top disk.Image, nb disk.Image, g int64) (data, zero int64) {
	t.Helper()
	ob := top.Backing()
	bo, bn := make([]byte, g), make([]byte, g)
	for off := int64(0); off < top.Size(); off += g {
		n := min(g, top.Size()-off)
		exts, err := top.MapLayer(off, n)
		if err != nil {
			t.Fatal(err)
		}
		if len(exts) != 1 || exts[0].State != disk.Unallocated {
			continue
		}
		if err := disk.ReadView(ob, bo[:n], off); err != nil {
			t.Fatal(err)
		}
		if err := disk.ReadView(nb, bn[:n], off); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(bo[:n], bn[:n]) {
			if isZero(bo[:n]) {
				zero++
			} else {
				data++
			}
		}
	}
	return
}

func TestRebaseRandom(t *testing.T) {
	testutil.NeedQemu(t)
	shrinkPipeline(t)
	s := labtest.Seed(t)
	ctx := context.Background()
	for it := range 16 {
		t.Run(fmt.Sprint(it), func(t *testing.T) {
			l := labtest.New(t, s+uint64(it))
			nodes := randomTree(l, 4+l.Rng.IntN(7))
			top := nodes[len(nodes)-1]
			if l.Rng.IntN(3) > 0 { // usually a fresh top with a little data
				top = l.Create("top", nodes[l.Rng.IntN(len(nodes))], 0, []int{64 << 10, 16 << 10}[l.Rng.IntN(2)])
				l.Scribble(top, l.Rng.IntN(10))
			}
			var onto []string
			for _, n := range nodes {
				if n != top && !inChain(l, n, top) {
					onto = append(onto, n)
				}
			}
			nb := ""
			if len(onto) > 0 && l.Rng.IntN(8) > 0 {
				nb = onto[l.Rng.IntN(len(onto))]
			}
			flat := labtest.FlatCopy(t, top)
			before := sums(t, l.Dir)

			ti := l.Open(top, true)
			var nbi disk.Image
			if nb != "" {
				nbi = l.Open(nb, true)
			}
			wantData, wantZero := expectedCopies(t, ti, nbi, int64(ti.Info().ClusterSize))
			if ti.Backing() == nil { // zeros are written as data there (see safeCopy)
				wantData, wantZero = wantData+wantZero, 0
			}
			ti.Close()

			inPlace := it%2 == 1
			rep, err := Rebase(ctx, top, nb, RebaseOptions{AllowedRoots: []string{l.Dir}, InPlace: inPlace})
			if err != nil {
				t.Fatalf("rebase %s onto %q: %v", top, nb, err)
			}
			if inPlace && rep.Rebuilt {
				t.Fatal("rebuilt although asked to write in place")
			}
			t.Logf("rebase %s onto %q: %+v", filepath.Base(top), filepath.Base(nb), *rep)
			if rep.Copied != wantData || rep.Zeroed != wantZero {
				t.Errorf("copied %d and zeroed %d clusters, want %d and %d", rep.Copied, rep.Zeroed, wantData, wantZero)
			}
			if !testutil.QemuCompare(t, top, flat) {
				t.Fatalf("guest view of %s changed by the rebase onto %s", top, nb)
			}
			after := sums(t, l.Dir)
			for name := range after {
				if strings.HasPrefix(name, ".tmp-") {
					t.Errorf("temporary file %s left behind", name)
				}
			}
			for name, sum := range before {
				if name != filepath.Base(top) && after[name] != sum {
					t.Errorf("%s changed: only the top may be written", name)
				}
			}
			img := l.Open(top, true)
			info := img.Info()
			if nb == "" {
				if info.BackingName != "" || img.Backing() != nil {
					t.Fatalf("backing %q left after rebase onto nothing", info.BackingName)
				}
			} else {
				if info.BackingName != filepath.Base(nb) || info.BackingFormat != disk.FormatQcow2 {
					t.Fatalf("backing name %q format %q, want %q qcow2", info.BackingName, info.BackingFormat, filepath.Base(nb))
				}
				if !layerKey(img.Backing()).same(pathKey(nb)) {
					t.Fatalf("top opens on %s, want %s", img.Backing().Info().Path, nb)
				}
			}
			// Rebasing again onto the same backing finds nothing to copy.
			img.Close()
			rep2, err := Rebase(ctx, top, nb, RebaseOptions{AllowedRoots: []string{l.Dir}})
			if err != nil {
				t.Fatal(err)
			}
			if rep2.Copied+rep2.Zeroed+rep2.Compared != 0 {
				t.Fatalf("second rebase onto the same chain did work: %+v", *rep2)
			}
		})
	}
}

// TestRebaseZeroClusters: where the old chain reads zeros and the new one holds
// data, the top gets zero clusters (no data), and stays readable by QEMU.
func TestRebaseZeroClusters(t *testing.T) {
	testutil.NeedQemu(t)
	l := labtest.New(t, 2)
	base := l.Create("base", "", 256<<20, 64<<10)
	newer := l.Create("new", base, 0, 64<<10)
	top := l.Create("top", base, 0, 64<<10)
	testutil.Run(t, "qemu-io", "-c", "write -P 0x5a 100M 32M", newer)
	testutil.Run(t, "qemu-io", "-c", "write -P 0x11 0 1M", top)
	flat := labtest.FlatCopy(t, top)
	rep, err := Rebase(context.Background(), top, newer, RebaseOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if rep.Zeroed != 512 || rep.Copied != 0 || rep.BytesWritten != 0 || rep.Growth() > 1<<20 {
		t.Fatalf("want 512 zero clusters and no data: %+v", *rep)
	}
	if !testutil.QemuCompare(t, top, flat) {
		t.Fatal("guest view changed")
	}
	out := testutil.Run(t, "qemu-img", "map", "--output=json", top)
	if !bytes.Contains([]byte(out), []byte(`"start": 104857600, "length": 33554432, "depth": 0, "present": true, "zero": true, "data": false`)) {
		t.Fatalf("qemu-img map does not show the zero clusters in the top:\n%s", out)
	}
}

// TestRebaseUnsafe only changes the backing name.
func TestRebaseUnsafe(t *testing.T) {
	testutil.NeedQemu(t)
	l := labtest.New(t, 3)
	base := l.Create("base", "", 8<<20, 64<<10)
	other := l.Create("other", "", 8<<20, 64<<10)
	testutil.Run(t, "qemu-io", "-c", "write -P 0x22 0 1M", other)
	top := l.Create("top", base, 0, 64<<10)
	sum := fileSum(t, top)
	rep, err := Rebase(context.Background(), top, other, RebaseOptions{Unsafe: true})
	if err != nil {
		t.Fatal(err)
	}
	if rep.Compared+rep.Copied+rep.Zeroed != 0 || rep.Growth() != 0 {
		t.Fatalf("unsafe rebase did work: %+v", *rep)
	}
	if fileSum(t, top) == sum {
		t.Fatal("header unchanged")
	}
	testutil.Run(t, "qemu-io", "-c", "read -P 0x22 0 1M", top)
	info := testutil.Run(t, "qemu-img", "info", "--output=json", top)
	for _, want := range []string{`"backing-filename": "` + filepath.Base(other) + `"`, `"backing-filename-format": "qcow2"`} {
		if !bytes.Contains([]byte(info), []byte(want)) {
			t.Fatalf("qemu-img info lacks %s:\n%s", want, info)
		}
	}
}

func TestRebaseRefusesLoop(t *testing.T) {
	l := labtest.New(t, 4)
	base := l.Create("base", "", 1<<20, 64<<10)
	top := l.Create("top", base, 0, 64<<10)
	over := l.Create("over", top, 0, 64<<10)
	if _, err := Rebase(context.Background(), top, over, RebaseOptions{}); err == nil {
		t.Fatal("rebase of a top onto its own overlay succeeded")
	}
	if _, err := Rebase(context.Background(), top, top, RebaseOptions{}); err == nil {
		t.Fatal("rebase of a top onto itself succeeded")
	}
}

func TestSealedLayersAreNeverWritten(t *testing.T) {
	l := labtest.New(t, 5)
	base := l.Create("base", "", 1<<20, 64<<10)
	other := l.Create("other", "", 1<<20, 64<<10)
	top := l.Create("top", base, 0, 64<<10)
	l.Scribble(top, 4)
	if err := os.Chmod(top, 0o444); err != nil {
		t.Fatal(err)
	}
	sum := fileSum(t, top)
	if _, err := Rebase(context.Background(), top, other, RebaseOptions{}); !errors.Is(err, ErrSealed) {
		t.Fatalf("rebase of a read-only top: %v", err)
	}
	if _, err := Rebase(context.Background(), top, other, RebaseOptions{Unsafe: true}); !errors.Is(err, ErrSealed) {
		t.Fatalf("unsafe rebase of a read-only top: %v", err)
	}
	if _, err := Commit(context.Background(), top, CommitOptions{}); !errors.Is(err, ErrSealed) {
		t.Fatalf("commit of a read-only top: %v", err)
	}
	os.Chmod(top, 0o644)
	store := func(p string) bool { return p == top }
	if _, err := Rebase(context.Background(), top, other, RebaseOptions{Sealed: store}); !errors.Is(err, ErrSealed) {
		t.Fatalf("rebase of a store layer: %v", err)
	}
	if fileSum(t, top) != sum {
		t.Fatal("a sealed top was written")
	}
}
