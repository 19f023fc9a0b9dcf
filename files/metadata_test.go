package files_test

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"

	"github.com/cvd-project/cvd/disk"
	"github.com/cvd-project/cvd/files"
	"github.com/cvd-project/cvd/internal/testutil"
)

// e2fsBlocks is the set of metadata blocks dumpe2fs and debugfs name.
func e2fsBlocks(t *testing.T, raw string) map[int64]string {
	t.Helper()
	out := map[int64]string{}
	mark := func(a, b int64, what string) {
		for x := a; x <= b; x++ {
			out[x] = what
		}
	}
	dump := testutil.Run(t, "dumpe2fs", raw)
	num := func(s string) int64 { n, _ := strconv.ParseInt(s, 10, 64); return n }
	for _, m := range regexp.MustCompile(`superblock at (\d+)`).FindAllStringSubmatch(dump, -1) {
		mark(num(m[1]), num(m[1]), "superblock")
	}
	for _, re := range []struct{ re, what string }{
		{`Group descriptors at (\d+)-(\d+)`, "group descriptors"},
		{`Reserved GDT blocks at (\d+)-(\d+)`, "reserved group descriptors"},
		{`Inode table at (\d+)-(\d+)`, "inode table"},
	} {
		for _, m := range regexp.MustCompile(re.re).FindAllStringSubmatch(dump, -1) {
			mark(num(m[1]), num(m[2]), re.what)
		}
	}
	for _, re := range []struct{ re, what string }{{`Block bitmap at (\d+)`, "block bitmap"}, {`Inode bitmap at (\d+)`, "inode bitmap"}} {
		for _, m := range regexp.MustCompile(re.re).FindAllStringSubmatch(dump, -1) {
			mark(num(m[1]), num(m[1]), re.what)
		}
	}
	for _, f := range strings.Fields(testutil.Run(t, "debugfs", "-R", "blocks <8>", raw)) {
		if n, err := strconv.ParseInt(f, 10, 64); err == nil {
			mark(n, n, "journal")
		}
	}
	return out
}

// The metadata blocks cvd finds are exactly those dumpe2fs and debugfs name, for
// file systems of several block sizes and features.
func TestMetadataAgreesWithDumpe2fs(t *testing.T) {
	testutil.NeedQemu(t)
	testutil.NeedTool(t, "e2fsprogs", "mkfs.ext4", "dumpe2fs", "debugfs")
	for _, tc := range []struct {
		name string
		size int64
		args []string
	}{
		{"256 MiB default (1K blocks here)", 256 << 20, nil},
		{"4K blocks", 256 << 20, []string{"-b", "4096"}},
		{"no flex_bg, no sparse_super", 128 << 20, []string{"-b", "4096", "-O", "^flex_bg,^sparse_super,^resize_inode"}},
		{"64bit, 2 GiB", 2 << 30, []string{"-O", "64bit"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			empty := filepath.Join(dir, "empty")
			os.Mkdir(empty, 0o755)
			raw := testutil.MakeExt4(t, filepath.Join(dir, "fs.raw"), empty, tc.size, tc.args...)
			q := filepath.Join(dir, "fs.qcow2")
			testutil.Run(t, "qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, q)
			img, err := disk.Open(q, disk.OpenOptions{ReadOnly: true})
			if err != nil {
				t.Fatal(err)
			}
			defer img.Close()
			m := regexp.MustCompile(`Block size:\s+(\d+)`).FindStringSubmatch(testutil.Run(t, "dumpe2fs", "-h", raw))
			if m == nil {
				t.Fatal("dumpe2fs -h names no block size")
			}
			bs, _ := strconv.ParseInt(m[1], 10, 64)
			rs, err := files.Metadata(context.Background(), img)
			if err != nil {
				t.Fatal(err)
			}
			got := map[int64]string{}
			for _, r := range rs {
				for b := r.Off / bs; b*bs < r.End(); b++ {
					got[b] = r.What
				}
			}
			want := e2fsBlocks(t, raw)
			var diffs []string
			for b, w := range want {
				if g, ok := got[b]; !ok {
					diffs = append(diffs, fmt.Sprintf("block %d (%s) missing", b, w))
				} else if g != w {
					diffs = append(diffs, fmt.Sprintf("block %d: %s, want %s", b, g, w))
				}
			}
			for b, g := range got {
				if _, ok := want[b]; !ok && !(b == 0 && bs > 1024) {
					diffs = append(diffs, fmt.Sprintf("block %d (%s) is not metadata to dumpe2fs", b, g))
				}
			}
			if len(diffs) > 0 {
				t.Fatalf("%d differences, first: %v", len(diffs), diffs[:min(8, len(diffs))])
			}
			t.Logf("%d metadata blocks of %d", len(got), tc.size/bs)
		})
	}
}
