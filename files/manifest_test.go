package files_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"testing"

	"github.com/cvd-project/cvd/disk"
	"github.com/cvd-project/cvd/files"
	"github.com/cvd-project/cvd/internal/testutil"
)

// tree writes a small system-like tree: nested directories, files of several
// sizes (an empty one, a sparse one, one over many extents), a symbolic link,
// set-uid and sticky modes, another owner.
func tree(t *testing.T, dir string) {
	t.Helper()
	mk := func(p string, b []byte, mode os.FileMode) {
		full := filepath.Join(dir, p)
		if err := os.MkdirAll(filepath.Dir(full), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(full, b, mode); err != nil {
			t.Fatal(err)
		}
		os.Chmod(full, mode)
	}
	mk("etc/hostname", []byte("desk\n"), 0o644)
	mk("etc/machine-id", []byte("0123456789abcdef0123456789abcdef\n"), 0o444)
	mk("etc/empty", nil, 0o600)
	mk("usr/bin/tool", testutil.Fill(7, 3<<20+123, false), 0o4755)
	mk("usr/share/doc/readme.txt", bytes.Repeat([]byte("cvd reads ext4\n"), 5000), 0o644)
	mk("home/user/notes.txt", []byte("user's notes"), 0o640)
	os.Chown(filepath.Join(dir, "home/user/notes.txt"), 1000, 1000)
	os.Chown(filepath.Join(dir, "home/user"), 1000, 1000)
	if err := os.MkdirAll(filepath.Join(dir, "tmp"), 0o777); err != nil {
		t.Fatal(err)
	}
	os.Chmod(filepath.Join(dir, "tmp"), 0o1777)
	if err := os.Symlink("../usr/bin/tool", filepath.Join(dir, "etc/tool-link")); err != nil {
		t.Fatal(err)
	}
	for i := range 40 {
		mk(fmt.Sprintf("var/lib/many/f%02d", i), testutil.Fill(uint64(100+i), int64(i*1000), false), 0o644)
	}
}

// mounted lists a loop-mounted file system as files.Entry values (mtime aside).
func mounted(t *testing.T, raw string, offset int64) []files.Entry {
	t.Helper()
	testutil.NeedTool(t, "loop", "mount", "umount")
	mnt := t.TempDir()
	opts := "loop,ro"
	if offset > 0 {
		opts += fmt.Sprintf(",offset=%d", offset)
	}
	if out, err := exec.Command("mount", "-o", opts, raw, mnt).CombinedOutput(); err != nil {
		t.Fatalf("mount %s: %v\n%s", raw, err, out)
	}
	defer exec.Command("umount", mnt).Run()
	var out []files.Entry
	err := filepath.WalkDir(mnt, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		fi, err := os.Lstat(p)
		if err != nil {
			return err
		}
		rel := "/" + strings.TrimPrefix(strings.TrimPrefix(p, mnt), "/")
		st := fi.Sys().(*syscall.Stat_t)
		e := files.Entry{Path: rel, UID: st.Uid, GID: st.Gid, Size: fi.Size(), Mode: fmt.Sprintf("%04o", st.Mode&0o7777)}
		switch {
		case fi.IsDir():
			e.Type, e.Size = "dir", 0
		case fi.Mode()&fs.ModeSymlink != 0:
			e.Type = "symlink"
			e.Target, _ = os.Readlink(p)
		case fi.Mode().IsRegular():
			e.Type = "file"
			b, err := os.ReadFile(p)
			if err != nil {
				return err
			}
			sum := sha256.Sum256(b)
			e.SHA256 = hex.EncodeToString(sum[:])
		default:
			e.Type = "other"
		}
		out = append(out, e)
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Path < out[j].Path })
	return out
}

func manifestOf(t *testing.T, path string) []files.FileSystem {
	t.Helper()
	img, err := disk.Open(path, disk.OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	m, err := files.Manifest(context.Background(), img)
	if err != nil {
		t.Fatal(err)
	}
	return m
}

// same fails unless cvd's manifest and the mounted tree agree on every file.
func same(t *testing.T, got, want []files.Entry) {
	t.Helper()
	for i := range got {
		got[i].MTime = want[0].MTime
	}
	for i := range want {
		want[i].MTime = want[0].MTime
	}
	if d := files.Diff(want, got); len(d) != 0 {
		for _, c := range d[:min(len(d), 10)] {
			t.Errorf("%s %s: mount %+v, cvd %+v", c.Kind, c.Path, c.Old, c.New)
		}
	}
	if len(got) != len(want) {
		t.Errorf("cvd lists %d entries, the mount %d", len(got), len(want))
	}
}

// A version's files as cvd reads them through a qcow2 chain agree with a loop
// mount of the same file system: on the whole disk and in a partition, before
// and after a mounted writer changed it (the change stored as an overlay); the
// diff of the two versions is exactly what the writer did.
func TestManifestAgreesWithMount(t *testing.T) {
	testutil.NeedQemu(t)
	testutil.NeedTool(t, "e2fsprogs", "mkfs.ext4", "e2fsck")
	for _, part := range []bool{false, true} {
		t.Run(map[bool]string{false: "whole disk", true: "MBR partition"}[part], func(t *testing.T) {
			dir := t.TempDir()
			src := filepath.Join(dir, "tree")
			tree(t, src)
			raw := filepath.Join(dir, "v1.raw")
			var off int64
			if err := os.WriteFile(raw, nil, 0o644); err != nil {
				t.Fatal(err)
			}
			if err := os.Truncate(raw, 96<<20); err != nil {
				t.Fatal(err)
			}
			if part {
				off = 1 << 20
				mbr := make([]byte, 512)
				e := mbr[446:]
				e[4] = 0x83
				binary.LittleEndian.PutUint32(e[8:], uint32(off/512))
				binary.LittleEndian.PutUint32(e[12:], uint32((96<<20-off)/512))
				mbr[510], mbr[511] = 0x55, 0xaa
				f, _ := os.OpenFile(raw, os.O_WRONLY, 0)
				f.WriteAt(mbr, 0)
				f.Close()
			}
			args := []string{"-q", "-F", "-L", "cvdtest", "-d", src}
			if part {
				args = append(args, "-E", fmt.Sprintf("offset=%d", off), raw, fmt.Sprintf("%dk", (96<<20-off)>>10))
			} else {
				args = append(args, raw)
			}
			testutil.Run(t, "mkfs.ext4", args...)
			v1 := filepath.Join(dir, "v1.qcow2")
			testutil.Run(t, "qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, v1)

			m1 := manifestOf(t, v1)
			if len(m1) != 1 || m1[0].Label != "cvdtest" || m1[0].Start != off {
				t.Fatalf("file systems: %+v", m1)
			}
			if p := map[bool]int{false: 0, true: 1}[part]; m1[0].Partition != p {
				t.Fatalf("partition %d, want %d", m1[0].Partition, p)
			}
			want1 := mounted(t, raw, off)
			same(t, m1[0].Files, want1)

			// A writer changes the file system through a mount; the change
			// becomes an overlay on v1.
			mnt := t.TempDir()
			opts := "loop"
			if off > 0 {
				opts += fmt.Sprintf(",offset=%d", off)
			}
			testutil.Run(t, "mount", "-o", opts, raw, mnt)
			os.WriteFile(filepath.Join(mnt, "home/user/new.txt"), testutil.Fill(9, 200000, false), 0o600)
			os.Remove(filepath.Join(mnt, "etc/empty"))
			os.WriteFile(filepath.Join(mnt, "etc/hostname"), []byte("desk-2\n"), 0o644)
			os.Chmod(filepath.Join(mnt, "usr/share/doc/readme.txt"), 0o600)
			testutil.Run(t, "umount", mnt)
			if !part {
				testutil.Run(t, "e2fsck", "-fn", raw)
			}
			v2 := filepath.Join(dir, "v2.qcow2")
			testutil.Run(t, "qemu-img", "convert", "-f", "raw", "-O", "qcow2", "-B", v1, "-F", "qcow2", raw, v2)
			m2 := manifestOf(t, v2)
			same(t, m2[0].Files, mounted(t, raw, off))

			got := map[string]string{}
			for _, c := range files.Diff(m1[0].Files, m2[0].Files) {
				got[c.Path] = c.Kind
			}
			want := map[string]string{"/home/user/new.txt": "added", "/etc/empty": "removed", "/etc/hostname": "changed",
				"/usr/share/doc/readme.txt": "changed"}
			for p, k := range want {
				if got[p] != k {
					t.Errorf("diff: %s is %q, want %q", p, got[p], k)
				}
			}
			for p, k := range got {
				if _, ok := want[p]; !ok && p != "/home/user" && p != "/etc" {
					t.Errorf("diff lists %s %s, which the writer did not touch", k, p)
				}
			}
		})
	}
}

// A disk with no ext4 file system is named so.
func TestManifestNoFileSystem(t *testing.T) {
	p := filepath.Join(t.TempDir(), "blank.qcow2")
	img, err := disk.Create(p, disk.CreateOptions{Size: 8 << 20})
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	if _, err := files.Manifest(context.Background(), img); !errors.Is(err, files.ErrNoFileSystem) {
		t.Fatalf("%v, want ErrNoFileSystem", err)
	}
}
