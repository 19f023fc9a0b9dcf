package files_test

import (
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/cvd-project/cvd/disk"
	"github.com/cvd-project/cvd/files"
	"github.com/cvd-project/cvd/internal/testutil"
)

// TestFAT32AgreesWithMtools: a disk with an MBR, an EFI system partition
// (FAT32, made by mkfs.vfat and filled by mtools) and an ext4 partition. The
// manifest names both; the FAT32 one's files (paths, long names, nested
// directories, sizes, SHA-256) are what mtools copies out of it.
func TestFAT32AgreesWithMtools(t *testing.T) {
	testutil.NeedQemu(t)
	testutil.NeedTool(t, "e2fsprogs", "mkfs.ext4")
	testutil.NeedTool(t, "fat", "mkfs.vfat", "mcopy")
	dir := t.TempDir()
	esp := filepath.Join(dir, "esp")
	for p, s := range map[string]string{
		"EFI/BOOT/BOOTX64.EFI":             strings.Repeat("efi binary ", 9000),
		"EFI/debian/grub.cfg":              "set root=(hd0,gpt2)\n",
		"EFI/debian/a long file name.conf": "long names are VFAT's\n",
		"startup.nsh":                      "",
	} {
		os.MkdirAll(filepath.Dir(filepath.Join(esp, p)), 0o755)
		os.WriteFile(filepath.Join(esp, p), []byte(s), 0o644)
	}
	const size, espOff, espSize = 128 << 20, 1 << 20, 40 << 20
	raw := filepath.Join(dir, "disk.raw")
	os.WriteFile(raw, nil, 0o644)
	os.Truncate(raw, size)
	mbr := make([]byte, 512)
	part := func(i int, typ byte, off, n int64) {
		e := mbr[446+16*i:]
		e[4] = typ
		binary.LittleEndian.PutUint32(e[8:], uint32(off/512))
		binary.LittleEndian.PutUint32(e[12:], uint32(n/512))
	}
	part(0, 0xef, espOff, espSize)
	part(1, 0x83, espOff+espSize, size-espOff-espSize)
	mbr[510], mbr[511] = 0x55, 0xaa
	f, _ := os.OpenFile(raw, os.O_WRONLY, 0)
	f.WriteAt(mbr, 0)
	f.Close()
	testutil.Run(t, "mkfs.vfat", "-F", "32", "-n", "ESP", "--offset", fmt.Sprint(espOff/512), raw, fmt.Sprint(espSize>>10))
	img := fmt.Sprintf("%s@@%d", raw, espOff)
	testutil.Run(t, "mcopy", "-s", "-i", img, filepath.Join(esp, "EFI"), filepath.Join(esp, "startup.nsh"), "::/")
	tree := filepath.Join(dir, "tree")
	os.MkdirAll(filepath.Join(tree, "etc"), 0o755)
	os.WriteFile(filepath.Join(tree, "etc", "hostname"), []byte("desk\n"), 0o644)
	testutil.Run(t, "mkfs.ext4", "-q", "-F", "-d", tree, "-E", fmt.Sprintf("offset=%d", espOff+espSize), raw,
		fmt.Sprintf("%dk", (size-espOff-espSize)>>10))
	q := filepath.Join(dir, "disk.qcow2")
	testutil.Run(t, "qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, q)

	m := manifestOf(t, q)
	if len(m) != 2 || m[0].Partition != 1 || m[0].Type != "vfat" || m[0].Start != espOff || m[1].Partition != 2 || m[1].Type != "ext4" {
		t.Fatalf("file systems: %+v", m)
	}
	// What mtools copies out of the partition.
	out := filepath.Join(dir, "out")
	os.MkdirAll(out, 0o755)
	testutil.Run(t, "mcopy", "-s", "-n", "-i", img, "::/EFI", "::/startup.nsh", out)
	want := map[string]string{}
	filepath.WalkDir(out, func(p string, d fs.DirEntry, err error) error {
		if err != nil || p == out {
			return err
		}
		rel := "/" + filepath.ToSlash(strings.TrimPrefix(p, out+"/"))
		if d.IsDir() {
			want[rel] = "dir"
			return nil
		}
		b, _ := os.ReadFile(p)
		h := sha256.Sum256(b)
		want[rel] = fmt.Sprintf("file %d %s", len(b), hex.EncodeToString(h[:]))
		return nil
	})
	got := map[string]string{}
	for _, e := range m[0].Files {
		switch e.Type {
		case "dir":
			if e.Path != "/" {
				got[e.Path] = "dir"
			}
		case "file":
			got[e.Path] = fmt.Sprintf("file %d %s", e.Size, e.SHA256)
		default:
			got[e.Path] = e.Type
		}
	}
	if len(got) != len(want) || len(want) < 7 {
		t.Errorf("FAT32 entries: %d, mtools: %d\n%v\n%v", len(got), len(want), got, want)
	}
	for p, w := range want {
		if got[p] != w {
			t.Errorf("%s: cvd %q, mtools %q", p, got[p], w)
		}
	}
	if e := m[0].Files[1]; e.Path != "/EFI" || e.Mode != "0755" || e.MTime.IsZero() {
		t.Errorf("FAT32 entry %+v", e)
	}
	t.Logf("FAT32 partition: %d entries agree with mtools; label %q", len(want), m[0].Label)
}

// TestFAT32Hostile: a FAT32 boot sector whose tables would not fit (or whose
// geometry is nonsense) is ErrCorrupt, read no further: go-diskfs would size
// its buffers from it.
func TestFAT32Hostile(t *testing.T) {
	testutil.NeedQemu(t)
	testutil.NeedTool(t, "fat", "mkfs.vfat")
	dir := t.TempDir()
	good := filepath.Join(dir, "esp.raw")
	os.WriteFile(good, nil, 0o644)
	os.Truncate(good, 40<<20)
	testutil.Run(t, "mkfs.vfat", "-F", "32", good)
	b, err := os.ReadFile(good)
	if err != nil {
		t.Fatal(err)
	}
	if m := manifestOf(t, good); len(m) != 1 || m[0].Type != "vfat" || m[0].Partition != 0 {
		t.Fatalf("the whole-disk FAT32 file system: %+v", m)
	}
	for _, c := range []struct {
		name string
		edit func(b []byte)
	}{
		{"huge FAT", func(b []byte) { binary.LittleEndian.PutUint32(b[36:], 0xffffffff) }},
		{"sector size 0", func(b []byte) { binary.LittleEndian.PutUint16(b[11:], 0) }},
		{"no FATs", func(b []byte) { b[16] = 0 }},
		{"cluster size 3", func(b []byte) { b[13] = 3 }},
		{"more sectors than the disk", func(b []byte) { binary.LittleEndian.PutUint32(b[32:], 0xfffffff0) }},
	} {
		t.Run(strings.ReplaceAll(c.name, " ", "_"), func(t *testing.T) {
			bad := append([]byte{}, b...)
			c.edit(bad)
			p := filepath.Join(dir, "bad.raw")
			os.WriteFile(p, bad, 0o644)
			img, err := disk.Open(p, disk.OpenOptions{ReadOnly: true, Format: disk.FormatRaw})
			if err != nil {
				t.Fatal(err)
			}
			defer img.Close()
			if _, err := files.Manifest(context.Background(), img); !errors.Is(err, files.ErrCorrupt) {
				t.Errorf("manifest: %v, want ErrCorrupt", err)
			}
		})
	}
}
