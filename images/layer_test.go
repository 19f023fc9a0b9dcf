package images

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/cvd-project/cvd/disk"
	"github.com/cvd-project/cvd/internal/testutil"
)

// baseCmds write a base with data, an explicit zero range and a partial cluster.
var baseCmds = []string{
	"write -P 0x11 0 1M",
	"write -P 0x22 4M 64k",
	"write -z 8M 1M",
	"write -P 0x33 12M 4k",
}

// TestLayerIDs checks that the ID follows guest content, not file bytes.
func TestLayerIDs(t *testing.T) {
	testutil.NeedQemu(t)
	dir := t.TempDir()
	base := makeImage(t, filepath.Join(dir, "base.qcow2"), "32M", "", baseCmds...)
	convert := func(name string, args ...string) func(t *testing.T) string {
		return func(t *testing.T) string {
			out := filepath.Join(dir, name)
			qimg(t, append(append([]string{"convert", "-O", "qcow2"}, args...), base, out)...)
			return out
		}
	}
	tests := []struct {
		name string
		make func(t *testing.T) string
		same bool
	}{
		{"reimport of the same file", func(t *testing.T) string { return base }, true},
		{"qemu-img convert", convert("conv.qcow2"), true},
		{"qemu-img convert compressed", convert("comp.qcow2", "-c"), true},
		{"qemu-img convert to raw", func(t *testing.T) string {
			out := filepath.Join(dir, "raw.img")
			qimg(t, "convert", "-O", "raw", base, out)
			return out
		}, true},
		{"qemu-img convert v2 (compat=0.10)", convert("v2.qcow2", "-o", "compat=0.10"), true},
		{"without the zero range (no parent: zero = unallocated)", func(t *testing.T) string {
			return makeImage(t, filepath.Join(dir, "nozero.qcow2"), "32M", "", baseCmds[0], baseCmds[1], baseCmds[3])
		}, true},
		{"all-zero data cluster instead of nothing", func(t *testing.T) string {
			return makeImage(t, filepath.Join(dir, "zerodata.qcow2"), "32M", "", append(baseCmds, "write -P 0 20M 64k")...)
		}, true},
		{"one changed cluster", func(t *testing.T) string {
			p := filepath.Join(dir, "changed.qcow2")
			qimg(t, "convert", "-O", "qcow2", base, p)
			qio(t, p, "write -P 0x44 4M 512")
			return p
		}, false},
		{"one more cluster", func(t *testing.T) string {
			p := filepath.Join(dir, "more.qcow2")
			qimg(t, "convert", "-O", "qcow2", base, p)
			qio(t, p, "write -P 0x11 30M 64k")
			return p
		}, false},
		{"other virtual size", func(t *testing.T) string {
			p := filepath.Join(dir, "bigger.qcow2")
			qimg(t, "convert", "-O", "qcow2", base, p)
			qimg(t, "resize", "-q", p, "64M")
			return p
		}, false},
		{"other cluster size", convert("cs4k.qcow2", "-o", "cluster_size=4096"), false},
	}
	s := openStore(t)
	ref := importT(t, s, base, ImportOptions{Names: []string{"base:1"}})
	if ref.Kind != KindBase || ref.Parent != "" {
		t.Fatalf("first import: %+v", ref)
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p := tt.make(t)
			l, existed, err := s.Import(context.Background(), p, ImportOptions{})
			if err != nil {
				t.Fatal(err)
			}
			if got := l.ID == ref.ID; got != tt.same {
				t.Errorf("same ID = %v, want %v (%s vs %s)", got, tt.same, ShortID(l.ID), ShortID(ref.ID))
			}
			if existed != tt.same {
				t.Errorf("existed = %v, want %v", existed, tt.same)
			}
			// ComputeID on the source file agrees with the store's copy.
			img, err := disk.Open(p, disk.OpenOptions{ReadOnly: true, NoBacking: true})
			if err != nil {
				t.Fatal(err)
			}
			id, _, err := ComputeID(context.Background(), img, "")
			img.Close()
			if err != nil {
				t.Fatal(err)
			}
			if id != l.ID {
				t.Errorf("ComputeID(source) = %s, store says %s", ShortID(id), ShortID(l.ID))
			}
			if !testutil.QemuCompare(t, p, s.LayerPath(l.ID)) {
				t.Errorf("store copy of %s reads differently", p)
			}
		})
	}
	// No second copy of content the store holds.
	n := 0
	for _, f := range layerFiles(t, s) {
		if strings.HasSuffix(f, ".qcow2") {
			n++
		}
	}
	ls, _ := s.Layers()
	if n != len(ls) {
		t.Errorf("%d layer files for %d layers", n, len(ls))
	}
	mustClean(t, s)
}

// TestOverlayIDs: in a layer with a parent, zero clusters count, and an all-zero
// data cluster counts as zero.
func TestOverlayIDs(t *testing.T) {
	testutil.NeedQemu(t)
	dir := t.TempDir()
	s := openStore(t)
	base := importT(t, s, makeImage(t, filepath.Join(dir, "base.qcow2"), "16M", "", "write -P 0x11 0 4M"), ImportOptions{Names: []string{"b:1"}})
	bp := s.LayerPath(base.ID)
	ov := func(name string, cmds ...string) string {
		return makeImage(t, filepath.Join(dir, name), "", bp, cmds...)
	}
	a := importT(t, s, ov("zero.qcow2", "write -P 0x22 0 64k", "write -z 1M 128k"), ImportOptions{Parent: "b:1"})
	b := importT(t, s, ov("zerodata.qcow2", "write -P 0x22 0 64k", "write -P 0 1M 128k"), ImportOptions{Parent: "b:1"})
	if a.ID != b.ID {
		t.Errorf("zero clusters vs all-zero data clusters: %s vs %s", ShortID(a.ID), ShortID(b.ID))
	}
	c := importT(t, s, ov("nozero.qcow2", "write -P 0x22 0 64k"), ImportOptions{Parent: "b:1"})
	if c.ID == a.ID {
		t.Errorf("an overlay without the zero clusters has the same ID: zero clusters hide the parent's data")
	}
	if a.Kind != KindApp || a.Parent != base.ID || a.Clusters != 3 || a.DataClusters != 1 {
		t.Errorf("layer record %+v", a)
	}
	// qemu-img convert of an overlay onto the same backing keeps the ID.
	conv := filepath.Join(dir, "conv.qcow2")
	qimg(t, "convert", "-O", "qcow2", "-B", bp, "-F", "qcow2", filepath.Join(dir, "zero.qcow2"), conv)
	d := importT(t, s, conv, ImportOptions{})
	if d.ID != a.ID {
		t.Errorf("converted overlay: %s, want %s", ShortID(d.ID), ShortID(a.ID))
	}
	// Same content on another parent: another ID.
	base2 := importT(t, s, makeImage(t, filepath.Join(dir, "base2.qcow2"), "16M", "", "write -P 0x12 0 4M"), ImportOptions{})
	e := importT(t, s, filepath.Join(dir, "zero.qcow2"), ImportOptions{Parent: base2.ID})
	if e.ID == a.ID {
		t.Error("same overlay on another parent has the same ID")
	}
	mustClean(t, s)
}

// TestImportOverlay: the store's copy of a layer points at its parent inside the
// store, with the format recorded, and reads as the source does.
func TestImportOverlay(t *testing.T) {
	testutil.NeedQemu(t)
	dir := t.TempDir()
	s := openStore(t)
	basePath := makeImage(t, filepath.Join(dir, "base.qcow2"), "64M", "", "write -P 0x11 0 8M")
	base := importT(t, s, basePath, ImportOptions{Kind: KindBase, Names: []string{"os:1"}})
	appPath := makeImage(t, filepath.Join(dir, "app.qcow2"), "", basePath, "write -P 0x22 1M 2M", "write -z 6M 1M", "discard 7M 64k")

	// The source's backing file is outside the store: the parent must be given.
	if _, _, err := s.Import(context.Background(), appPath, ImportOptions{Kind: KindApp}); !errors.Is(err, ErrNoParent) {
		t.Fatalf("import without parent: %v, want ErrNoParent", err)
	}
	if _, _, err := s.Import(context.Background(), appPath, ImportOptions{Kind: KindBase, Parent: "os:1"}); err == nil {
		t.Fatal("a base with a parent was accepted")
	}
	app := importT(t, s, appPath, ImportOptions{Kind: KindApp, Parent: "os", Names: []string{"office:2026"}})
	p := s.LayerPath(app.ID)
	img, err := disk.Open(p, disk.OpenOptions{ReadOnly: true, NoBacking: true})
	if err != nil {
		t.Fatal(err)
	}
	info := img.Info()
	img.Close()
	if info.BackingName != base.ID+".qcow2" || info.BackingFormat != disk.FormatQcow2 {
		t.Errorf("backing %q format %q", info.BackingName, info.BackingFormat)
	}
	chain := qimg(t, "info", "--backing-chain", p)
	if strings.Count(chain, "\nfile format: qcow2") != 2 || !strings.Contains(chain, "\nbacking file format: qcow2") {
		t.Errorf("qemu-img info --backing-chain:\n%s", chain)
	}
	if !testutil.QemuCompare(t, appPath, p) {
		t.Error("the store's app layer reads differently from its source")
	}
	fi, _ := os.Stat(p)
	if fi.Mode().Perm()&0o222 != 0 {
		t.Errorf("layer file mode %v", fi.Mode())
	}
	// Importing a file whose backing file is a store layer finds the parent.
	ov := makeImage(t, filepath.Join(dir, "ov.qcow2"), "", p, "write -P 0x33 0 64k")
	l := importT(t, s, ov, ImportOptions{})
	if l.Parent != app.ID || l.Kind != KindApp {
		t.Errorf("auto parent: %+v", l)
	}
	mustClean(t, s)
}

func TestSeal(t *testing.T) {
	testutil.NeedQemu(t)
	dir := t.TempDir()
	s := openStore(t)
	base := importT(t, s, makeImage(t, filepath.Join(dir, "base.qcow2"), "32M", "", "write -P 0x11 0 4M"), ImportOptions{Names: []string{"os:1"}})
	top := makeImage(t, filepath.Join(dir, "top.qcow2"), "", s.LayerPath(base.ID), "write -P 0x77 64k 64k")
	l, existed, err := s.Seal(context.Background(), top, ImportOptions{Names: []string{"os:1-patched"}})
	if err != nil || existed {
		t.Fatal(existed, err)
	}
	if l.Kind != KindVersion || l.Parent != base.ID || l.DataClusters != 1 {
		t.Errorf("sealed %+v", l)
	}
	if !testutil.QemuCompare(t, top, s.LayerPath(l.ID)) {
		t.Error("sealed layer reads differently from the overlay")
	}
	// Sealing again gives the same layer.
	l2, existed, err := s.Seal(context.Background(), top, ImportOptions{})
	if err != nil || !existed || l2.ID != l.ID {
		t.Errorf("second seal: %v %v %v", l2, existed, err)
	}
	// An overlay on a file outside the store cannot be sealed.
	other := makeImage(t, filepath.Join(dir, "other.qcow2"), "", filepath.Join(dir, "base.qcow2"))
	if _, _, err := s.Seal(context.Background(), other, ImportOptions{}); !errors.Is(err, ErrNoParent) {
		t.Errorf("seal of an overlay outside the store: %v", err)
	}
	if _, _, err := s.Seal(context.Background(), filepath.Join(dir, "base.qcow2"), ImportOptions{}); !errors.Is(err, ErrNoParent) {
		t.Errorf("seal of an image without backing: %v", err)
	}
	mustClean(t, s)
}

func TestVerifyCatchesAlteredLayer(t *testing.T) {
	testutil.NeedQemu(t)
	dir := t.TempDir()
	s := openStore(t)
	a := importT(t, s, makeImage(t, filepath.Join(dir, "a.qcow2"), "16M", "", "write -P 0x11 0 1M"), ImportOptions{})
	b := importT(t, s, makeImage(t, filepath.Join(dir, "b.qcow2"), "16M", "", "write -P 0x12 0 1M"), ImportOptions{})
	res, err := s.Verify(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range res {
		if !r.OK {
			t.Fatalf("fresh store: %+v", r)
		}
	}
	p := s.LayerPath(a.ID)
	os.Chmod(p, 0o644)
	qio(t, p, "write -P 0x99 512k 4k")
	res, err = s.Verify(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range res {
		switch r.ID {
		case a.ID:
			if r.OK || r.Computed == a.ID {
				t.Errorf("altered layer passes verify: %+v", r)
			}
		case b.ID:
			if !r.OK {
				t.Errorf("untouched layer fails verify: %+v", r)
			}
		}
	}
	rep, err := s.Check(context.Background(), CheckOptions{})
	if err != nil {
		t.Fatal(err)
	}
	kinds := map[string]bool{}
	for _, p := range rep.Problems {
		kinds[p.Kind] = true
	}
	if !kinds[ProblemAltered] || !kinds[ProblemWritable] {
		t.Errorf("check of an altered layer: %v", rep.Problems)
	}
}

func TestNames(t *testing.T) {
	testutil.NeedQemu(t)
	dir := t.TempDir()
	s := openStore(t)
	a := importT(t, s, makeImage(t, filepath.Join(dir, "a.qcow2"), "16M", "", "write -P 1 0 64k"), ImportOptions{Names: []string{"win11:2026-10", "win11:2026-11"}})
	b := importT(t, s, makeImage(t, filepath.Join(dir, "b.qcow2"), "16M", "", "write -P 2 0 64k"), ImportOptions{Names: []string{"office"}})
	tests := []struct {
		name, ref string
		want      string
		err       error
	}{
		{"name and tag", "win11:2026-11", a.ID, nil},
		{"bare name, latest", "office", b.ID, nil},
		{"name:latest", "office:latest", b.ID, nil},
		{"bare name with two tags", "win11", "", ErrAmbiguous},
		{"full ID", a.ID, a.ID, nil},
		{"sha256: prefix", "sha256:" + a.ID[:10], a.ID, nil},
		{"prefix", b.ID[:6], b.ID, nil},
		{"too short prefix", a.ID[:3], "", ErrNotFound},
		{"unknown tag", "win11:2027", "", ErrNotFound},
		{"unknown name", "linux", "", ErrNotFound},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := s.Resolve(tt.ref)
			if tt.err != nil {
				if !errors.Is(err, tt.err) {
					t.Errorf("Resolve(%q) = %v, want %v", tt.ref, err, tt.err)
				}
				return
			}
			if err != nil || got != tt.want {
				t.Errorf("Resolve(%q) = %s, %v", tt.ref, got, err)
			}
		})
	}
	if err := s.Tag(b.ID, "win11:2026-11", false); !errors.Is(err, ErrExists) {
		t.Errorf("moving a tag without force: %v", err)
	}
	if err := s.Tag(b.ID, "win11:2026-11", true); err != nil {
		t.Fatal(err)
	}
	if id, _ := s.Resolve("win11:2026-11"); id != b.ID {
		t.Error("forced tag did not move")
	}
	if err := s.Untag("win11:2026-10"); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Resolve("win11"); err != nil {
		t.Errorf("the only tag left: %v", err)
	}
	for _, bad := range []string{"", ":x", "a b:c", "x:", "deadbeef"} {
		if _, _, err := ParseNameTag(bad); !errors.Is(err, ErrInvalid) {
			t.Errorf("ParseNameTag(%q) = %v", bad, err)
		}
	}
	mustClean(t, s)
}

// TestImportRawOddSizes: a raw file whose size is not whole sectors becomes a
// layer of whole sectors (as QEMU rounds it) that verifies clean and reads as
// the file, zero-padded.
func TestImportRawOddSizes(t *testing.T) {
	testutil.NeedQemu(t)
	s := openStore(t)
	for _, n := range []int{1, 15, 511, 513, 65535, 65537} {
		t.Run(fmt.Sprint(n), func(t *testing.T) {
			p := filepath.Join(t.TempDir(), "odd.raw")
			b := make([]byte, n)
			for i := range b {
				b[i] = byte(i*7 + n)
			}
			os.WriteFile(p, b, 0o644)
			l, _, err := s.Import(context.Background(), p, ImportOptions{Kind: KindBase})
			if err != nil {
				t.Fatal(err)
			}
			if want := int64((n + 511) &^ 511); l.Size != want {
				t.Errorf("layer size %d, want %d", l.Size, want)
			}
			res, err := s.Verify(context.Background(), l.ID)
			if err != nil || len(res) != 1 || !res[0].OK {
				t.Fatalf("verify right after import: %+v %v", res, err)
			}
			out, err := testutil.RunErr("qemu-img", "compare", "-f", "raw", "-F", "qcow2", p, s.LayerPath(l.ID))
			if err != nil {
				t.Errorf("qemu-img compare: %v\n%s", err, out)
			}
		})
	}
	mustClean(t, s)
}
