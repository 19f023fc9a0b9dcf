package clone_test

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/cvd-project/cvd/clone"
	"github.com/cvd-project/cvd/files"
	"github.com/cvd-project/cvd/images"
	"github.com/cvd-project/cvd/internal/testutil"
)

// Ten clones of a desktop whose file system holds a machine-id (it has booted)
// come up with ten distinct ones, each its UUID's digits, and their own
// hostnames (longer than the layer's: the inode's size and checksum change),
// in their own tops; every
// clone's file system passes e2fsck -fn and the layer is unchanged. A layer
// without a machine-id gets none written.
func TestClonesGetTheirOwnMachineID(t *testing.T) {
	testutil.NeedQemu(t)
	testutil.NeedTool(t, "e2fsprogs", "mkfs.ext4", "e2fsck")
	dir := t.TempDir()
	src := filepath.Join(dir, "tree")
	os.MkdirAll(filepath.Join(src, "etc"), 0o755)
	os.WriteFile(filepath.Join(src, "etc", "machine-id"), []byte("0123456789abcdef0123456789abcdef\n"), 0o444)
	os.WriteFile(filepath.Join(src, "etc", "hostname"), []byte("golden\n"), 0o644)
	raw := testutil.MakeExt4(t, filepath.Join(dir, "fs.raw"), src, 64<<20)
	q := filepath.Join(dir, "fs.qcow2")
	testutil.Run(t, "qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, q)

	st, err := images.Open(filepath.Join(dir, "store"), images.OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	ctx := context.Background()
	l, _, err := st.Import(ctx, q, images.ImportOptions{Kind: images.KindBase, Names: []string{"os:1"}})
	if err != nil {
		t.Fatal(err)
	}
	layerSum := testutil.Run(t, "sha256sum", st.LayerPath(l.ID))
	recs, err := clone.Create(ctx, st, "os:1", clone.Options{Name: "pc", Count: 10})
	if err != nil {
		t.Fatal(err)
	}
	seen := map[string]bool{}
	for _, r := range recs {
		img, err := st.OpenTop(r.Disk, true, false)
		if err != nil {
			t.Fatal(err)
		}
		loc, err := files.Locate(ctx, img, "/etc/machine-id")
		if err != nil {
			t.Fatal(err)
		}
		host, err := files.Locate(ctx, img, "/etc/hostname")
		if err != nil || string(host.Content) != r.Hostname+"\n" {
			t.Fatalf("clone %s: hostname file %q (%v), want %q", r.Name, host.Content, err, r.Hostname)
		}
		img.Close()
		id := strings.TrimSpace(string(loc.Content))
		if id != r.MachineID || id != strings.ReplaceAll(r.UUID, "-", "") || seen[id] {
			t.Fatalf("clone %s: machine-id %q, record %q, uuid %s (seen before: %v)", r.Name, id, r.MachineID, r.UUID, seen[id])
		}
		seen[id] = true
		out := filepath.Join(dir, r.Name+".raw")
		testutil.Run(t, "qemu-img", "convert", "-O", "raw", st.Path(r.Disk), out)
		testutil.Run(t, "e2fsck", "-fn", out)
		os.Remove(out)
		testutil.QemuCheck(t, st.Path(r.Disk))
	}
	if got := testutil.Run(t, "sha256sum", st.LayerPath(l.ID)); got != layerSum {
		t.Fatal("the layer changed")
	}
	t.Logf("%d clones, %d distinct machine-ids", len(recs), len(seen))

	// A layer whose machine-id is empty (never booted): nothing is written.
	os.WriteFile(filepath.Join(src, "etc", "machine-id"), nil, 0o444)
	raw2 := testutil.MakeExt4(t, filepath.Join(dir, "fs2.raw"), src, 64<<20)
	q2 := filepath.Join(dir, "fs2.qcow2")
	testutil.Run(t, "qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw2, q2)
	if _, _, err := st.Import(ctx, q2, images.ImportOptions{Kind: images.KindBase, Names: []string{"fresh:1"}}); err != nil {
		t.Fatal(err)
	}
	fresh, err := clone.Create(ctx, st, "fresh:1", clone.Options{Name: "new", Count: 2})
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range fresh {
		if r.MachineID != "" {
			t.Errorf("clone %s of a never-booted layer got machine-id %q", r.Name, r.MachineID)
		}
	}
}
