package main

import (
	"encoding/json"
	"os"
	"path/filepath"
	"testing"

	"github.com/cvd-project/cvd/desktop"
	"github.com/cvd-project/cvd/files"
	"github.com/cvd-project/cvd/images"
	"github.com/cvd-project/cvd/internal/testutil"
)

// cvd desktop files and desktop diff --files on two versions whose base layers
// hold ext4 file systems built from two trees.
func TestDesktopFilesAndDiff(t *testing.T) {
	testutil.NeedQemu(t)
	testutil.NeedTool(t, "e2fsprogs", "mkfs.ext4")
	dir := t.TempDir()
	store := filepath.Join(dir, "store")
	write := func(p, s string) {
		os.MkdirAll(filepath.Dir(p), 0o755)
		if err := os.WriteFile(p, []byte(s), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	for i, tree := range []map[string]string{
		{"etc/hostname": "one\n", "home/a.txt": "a", "usr/app": "v1"},
		{"etc/hostname": "two\n", "home/b.txt": "b", "usr/app": "v1"},
	} {
		src := filepath.Join(dir, "t"+string(rune('1'+i)))
		for p, s := range tree {
			write(filepath.Join(src, p), s)
		}
		raw := testutil.MakeExt4(t, filepath.Join(dir, "r.raw"), src, 32<<20)
		q := filepath.Join(dir, "v"+string(rune('1'+i))+".qcow2")
		testutil.Run(t, "qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, q)
		mustCvd(t, store, "layer", "import", q, "--kind", "base", "--name", "os:"+string(rune('1'+i)))
	}
	mustCvd(t, store, "desktop", "create", "d", "--base", "os:1")
	mustCvd(t, store, "recompose", "d", "--base", "os:2")

	var fss []files.FileSystem
	if err := json.Unmarshal([]byte(mustCvd(t, store, "--json", "desktop", "files", "d", "--version", "1")), &fss); err != nil {
		t.Fatal(err)
	}
	got := map[string]string{}
	for _, e := range fss[0].Files {
		got[e.Path] = e.SHA256
	}
	if got["/home/a.txt"] != "ca978112ca1bbdcafac231b39a23dc4da786eff8147c4e72b9807785afee48bb" || got["/etc"] != "" {
		t.Fatalf("version 1's files: %v", got)
	}
	st, err := images.Open(store, images.OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	d, err := st.Desktop("d")
	if err != nil {
		t.Fatal(err)
	}
	if !desktop.ManifestCached(st, d.Versions[0].System) {
		t.Error("the listed version's manifest is not cached")
	}
	st.Close()
	var ds []desktop.FileSystemDiff
	if err := json.Unmarshal([]byte(mustCvd(t, store, "--json", "desktop", "diff", "d", "--files", "--from", "1", "--to", "2")), &ds); err != nil {
		t.Fatal(err)
	}
	kinds := map[string]string{}
	for _, c := range ds[0].Changes {
		kinds[c.Path] = c.Kind
	}
	want := map[string]string{"/etc/hostname": "changed", "/home/a.txt": "removed", "/home/b.txt": "added"}
	for p, k := range want {
		if kinds[p] != k {
			t.Errorf("%s: %q, want %q (all: %v)", p, kinds[p], k, kinds)
		}
	}
	if len(kinds) != len(want) {
		t.Errorf("changes %v, want %v", kinds, want)
	}
	if out, err := cvdIn(t, store, "desktop", "diff", "d", "--from", "1", "--to", "2"); err == nil {
		t.Fatalf("diff without --files: %s", out)
	}
}
