package images

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/cvd-project/cvd/disk"
	"github.com/cvd-project/cvd/internal/testutil"
)

// adoptTop makes a writable top on parent with cvd, at dir/name, holding four
// data clusters (a pattern) and two zero clusters.
func adoptTop(t *testing.T, s *Store, parent *Layer, dir, name string, pattern byte) string {
	t.Helper()
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, name)
	img, err := disk.Create(path, disk.CreateOptions{BackingFile: s.LayerPath(parent.ID), BackingFormat: disk.FormatQcow2,
		AllowedRoots: []string{s.Dir()}})
	if err != nil {
		t.Fatal(err)
	}
	b := make([]byte, 256<<10)
	for i := range b {
		b[i] = pattern + byte(i>>16)
	}
	if _, err := img.WriteAt(b, 1<<20); err != nil {
		t.Fatal(err)
	}
	if err := img.WriteZeroes(0, 128<<10); err != nil {
		t.Fatal(err)
	}
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	return path
}

func TestAdopt(t *testing.T) {
	testutil.NeedQemu(t)
	ctx := context.Background()
	src := t.TempDir()
	s := openStore(t)
	base := importT(t, s, makeImage(t, filepath.Join(src, "base.qcow2"), "32M", "", "write -P 0x11 0 4M"), ImportOptions{})

	// A top in a direct subdirectory of the store: adopted as it is.
	top := adoptTop(t, s, base, s.Path(DesktopsDir), "d.system.qcow2", 0x40)
	want, err := func() (string, error) {
		img, err := disk.Open(top, disk.OpenOptions{ReadOnly: true, NoBacking: true})
		if err != nil {
			return "", err
		}
		defer img.Close()
		id, _, err := ComputeID(ctx, img, base.ID)
		return id, err
	}()
	if err != nil {
		t.Fatal(err)
	}
	// An expected ID that differs refuses it and leaves it as it was.
	if _, _, err := s.Adopt(ctx, top, AdoptOptions{WantID: base.ID}); !errors.Is(err, ErrIDMismatch) {
		t.Fatalf("adopt with another expected ID: %v", err)
	}
	if fi, _ := os.Stat(top); fi.Mode().Perm() != 0o644 {
		t.Errorf("a refused adoption changed the file's mode to %v", fi.Mode().Perm())
	}
	l, existed, err := s.Adopt(ctx, top, AdoptOptions{WantID: want, ImportOptions: ImportOptions{Names: []string{"d:1"}}})
	if err != nil || existed {
		t.Fatal(existed, err)
	}
	if l.ID != want || l.Parent != base.ID || l.Kind != KindVersion || l.DataClusters != 4 || l.Clusters != 6 {
		t.Errorf("adopted %+v", l)
	}
	a, _ := os.Stat(top)
	b, _ := os.Stat(s.LayerPath(l.ID))
	if !os.SameFile(a, b) || b.Mode().Perm() != 0o444 {
		t.Errorf("the layer file is not the adopted file made read-only (same %v, mode %v)", os.SameFile(a, b), b.Mode().Perm())
	}
	// Sealing a copy of the same content gives the same layer.
	sealed, existed, err := s.Seal(ctx, top, ImportOptions{})
	if err != nil || !existed || sealed.ID != l.ID {
		t.Errorf("seal of the adopted content: %v %v %v", sealed, existed, err)
	}
	// The caller replaces its top; the layer stays and reads as the top did.
	if err := os.Remove(top); err != nil {
		t.Fatal(err)
	}
	if res, err := s.Verify(ctx, l.ID); err != nil || !res[0].OK {
		t.Errorf("verify the adopted layer: %+v %v", res, err)
	}

	// A second top of the same content: the store holds it already; the file is
	// left alone.
	again := adoptTop(t, s, base, s.Path(DesktopsDir), "e.system.qcow2", 0x40)
	l2, existed, err := s.Adopt(ctx, again, AdoptOptions{})
	if err != nil || !existed || l2.ID != l.ID {
		t.Errorf("adopt of content the store holds: %v %v %v", l2, existed, err)
	}
	if fi, _ := os.Stat(again); fi.Mode().Perm() != 0o644 {
		t.Errorf("an adoption of held content changed the file's mode to %v", fi.Mode().Perm())
	}
	os.Remove(again)

	// Deeper in the store the backing name does not hold from the layers
	// directory: refused, unless the caller gives the file away.
	deep := adoptTop(t, s, base, s.Path("sync/sessions/x"), "system.qcow2", 0x50)
	if _, _, err := s.Adopt(ctx, deep, AdoptOptions{}); !errors.Is(err, ErrNotAdoptable) {
		t.Fatalf("adopt of a deep top: %v", err)
	}
	l3, _, err := s.Adopt(ctx, deep, AdoptOptions{RewriteBacking: true})
	if err != nil {
		t.Fatal(err)
	}
	if res, err := s.Verify(ctx, l3.ID); err != nil || !res[0].OK {
		t.Errorf("verify the adopted layer with a rewritten backing name: %+v %v", res, err)
	}
	os.Remove(deep)

	// Outside the store, or with leaked clusters: refused.
	outside := adoptTop(t, s, base, src, "out.qcow2", 0x60)
	if _, _, err := s.Adopt(ctx, outside, AdoptOptions{}); !errors.Is(err, ErrNotAdoptable) {
		t.Errorf("adopt from outside the store: %v", err)
	}
	leaky := adoptTop(t, s, base, s.Path(DesktopsDir), "leaky.qcow2", 0x70)
	leak(t, leaky)
	if _, _, err := s.Adopt(ctx, leaky, AdoptOptions{}); !errors.Is(err, ErrNotAdoptable) {
		t.Errorf("adopt of a leaky file: %v", err)
	}
	os.Remove(leaky)
	mustClean(t, s)
}

// leak makes the qcow2 file at path leak one cluster, as a writer killed between
// its refcount update and its mapping leaves it: the file grows by a cluster that
// the first refcount block counts and nothing references. qemu-img check must then
// report exactly that leak.
func leak(t *testing.T, path string) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var h [104]byte
	if _, err := f.ReadAt(h[:], 0); err != nil {
		t.Fatal(err)
	}
	be := binary.BigEndian
	cs := int64(1) << be.Uint32(h[20:])
	order := be.Uint32(h[96:])
	if order != 4 {
		t.Fatalf("refcount order %d, this helper writes 16-bit refcounts", order)
	}
	var e [8]byte
	if _, err := f.ReadAt(e[:], int64(be.Uint64(h[48:]))); err != nil {
		t.Fatal(err)
	}
	block := int64(be.Uint64(e[:]))
	fi, err := f.Stat()
	if err != nil {
		t.Fatal(err)
	}
	idx := (fi.Size() + cs - 1) / cs
	if idx >= cs/2 {
		t.Fatalf("file too large for its first refcount block")
	}
	if err := f.Truncate((idx + 1) * cs); err != nil {
		t.Fatal(err)
	}
	var rc [2]byte
	be.PutUint16(rc[:], 1)
	if _, err := f.WriteAt(rc[:], block+2*idx); err != nil {
		t.Fatal(err)
	}
	out, _ := testutil.RunErr("qemu-img", "check", path)
	if !strings.Contains(out, "1 leaked cluster") {
		t.Fatalf("no leak made: qemu-img check says\n%s", out)
	}
}

// TestAdoptSums: a caller's cluster list stands in for reading the file when it
// matches the file's allocation, and gives the ID a full read gives; a list that
// leaves out, adds or mislabels a cluster is refused.
func TestAdoptSums(t *testing.T) {
	testutil.NeedQemu(t)
	ctx := context.Background()
	src := t.TempDir()
	s := openStore(t)
	base := importT(t, s, makeImage(t, filepath.Join(src, "base.qcow2"), "32M", "", "write -P 0x11 0 4M"), ImportOptions{})
	top := adoptTop(t, s, base, s.Path(DesktopsDir), "d.system.qcow2", 0x40)
	img, err := disk.Open(top, disk.OpenOptions{ReadOnly: true, NoBacking: true})
	if err != nil {
		t.Fatal(err)
	}
	want, sums := idAndSums(t, img, base.ID)
	img.Close()
	if len(sums) != 6 {
		t.Fatalf("listed %d clusters, want 6", len(sums))
	}
	seq := func(ss []ClusterSum) func(func(ClusterSum) bool) { return slices.Values(ss) }
	bad := map[string][]ClusterSum{
		"one left out": slices.Delete(slices.Clone(sums), 3, 4),
		"one added":    append(slices.Clone(sums), ClusterSum{Index: 200, Len: 65536}),
		"zero listed as data": func() []ClusterSum {
			ss := slices.Clone(sums)
			ss[0] = ClusterSum{Index: ss[0].Index, Len: 65536}
			return ss
		}(),
		"out of order": func() []ClusterSum {
			ss := slices.Clone(sums)
			ss[2], ss[3] = ss[3], ss[2]
			return ss
		}(),
		"another digest": func() []ClusterSum {
			ss := slices.Clone(sums)
			ss[4].Digest[0] ^= 1
			return ss
		}(),
	}
	for name, ss := range bad {
		if _, _, err := s.Adopt(ctx, top, AdoptOptions{WantID: want, Sums: seq(ss)}); !errors.Is(err, ErrIDMismatch) {
			t.Errorf("%s: adopt gave %v, want ErrIDMismatch", name, err)
		}
	}
	l, _, err := s.Adopt(ctx, top, AdoptOptions{WantID: want, Sums: seq(sums)})
	if err != nil {
		t.Fatal(err)
	}
	if l.ID != want || l.DataClusters != 4 || l.DataBytes != 4*65536 {
		t.Errorf("adopted %+v", l)
	}
	os.Remove(top)
	if res, err := s.Verify(ctx, l.ID); err != nil || !res[0].OK {
		t.Errorf("verify: %+v %v", res, err)
	}

	// A top without a parent (a blank user disk): zero clusters and data
	// clusters holding zeros are not listed.
	user := s.Path(DesktopsDir + "/d.user.qcow2")
	uimg, err := disk.Create(user, disk.CreateOptions{Size: 8 << 20})
	if err != nil {
		t.Fatal(err)
	}
	for _, w := range []struct {
		off int64
		b   byte
	}{{0, 0x5a}, {2 << 20, 0}, {5 << 20, 0x5b}} {
		if _, err := uimg.WriteAt(bytes.Repeat([]byte{w.b}, 65536), w.off); err != nil {
			t.Fatal(err)
		}
	}
	if err := uimg.WriteZeroes(1<<20, 65536); err != nil {
		t.Fatal(err)
	}
	uwant, usums := idAndSums(t, uimg, "")
	uimg.Close()
	if len(usums) != 2 {
		t.Fatalf("listed %d clusters of the user top, want 2", len(usums))
	}
	ul, _, err := s.Adopt(ctx, user, AdoptOptions{WantID: uwant, Sums: seq(usums)})
	if err != nil {
		t.Fatal(err)
	}
	if ul.ID != uwant || ul.Parent != "" || ul.Kind != KindBase {
		t.Errorf("adopted user top %+v", ul)
	}
	os.Remove(user)
	mustClean(t, s)
}

// idAndSums returns the ID of img's layer on parent and its SumLayer list.
func idAndSums(t *testing.T, img disk.Image, parent string) (string, []ClusterSum) {
	t.Helper()
	ctx := context.Background()
	id, _, err := ComputeID(ctx, img, parent)
	if err != nil {
		t.Fatal(err)
	}
	var sums []ClusterSum
	if err := SumLayer(ctx, img, DigestClusterSize(img.Info()), parent != "", func(c ClusterSum) error {
		sums = append(sums, c)
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	return id, sums
}
