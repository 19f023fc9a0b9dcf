package files_test

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/cvd-project/cvd/disk"
	"github.com/cvd-project/cvd/files"
	"github.com/cvd-project/cvd/internal/testutil"
)

// fsEdit is what a device does to its user disk: files written (path →
// content) and removed.
type fsEdit struct {
	write  map[string]string
	remove []string
}

// edited copies the raw file system base, makes the edit through a loop mount
// (the kernel writes, as a guest's would) and returns it as a qcow2 overlay
// of baseQ.
func edited(t *testing.T, dir, name, base, baseQ string, e fsEdit) string {
	t.Helper()
	raw := filepath.Join(dir, name+".raw")
	testutil.Run(t, "cp", "--sparse=always", base, raw)
	mnt := t.TempDir()
	testutil.Run(t, "mount", "-o", "loop", raw, mnt)
	for p, s := range e.write {
		full := filepath.Join(mnt, p)
		os.MkdirAll(filepath.Dir(full), 0o755)
		if err := os.WriteFile(full, []byte(s), 0o644); err != nil {
			exec.Command("umount", mnt).Run()
			t.Fatal(err)
		}
	}
	for _, p := range e.remove {
		if err := os.Remove(filepath.Join(mnt, p)); err != nil {
			exec.Command("umount", mnt).Run()
			t.Fatal(err)
		}
	}
	testutil.Run(t, "umount", mnt)
	q := filepath.Join(dir, name+".qcow2")
	testutil.Run(t, "qemu-img", "convert", "-f", "raw", "-O", "qcow2", "-B", baseQ, "-F", "qcow2", raw, q)
	return q
}

// oneFS is the only file system of the disk at path.
func oneFS(t *testing.T, path string) files.FileSystem {
	t.Helper()
	m := manifestOf(t, path)
	if len(m) != 1 {
		t.Fatalf("%s: %d file systems", path, len(m))
	}
	return m[0]
}

func sum(s string) string {
	h := sha256.Sum256([]byte(s))
	return hex.EncodeToString(h[:])
}

// TestSyncMergeTable1: each case of the seed's Table 1 on two devices' user
// disks (ext4 written through the kernel over a shared base version). The
// merge builds on this device's disk with what changed on the other; the
// case's resolution is the table's action, `e2fsck -fn` is clean on the
// merged disk, and its files (paths and SHA-256) are the model's.
func TestSyncMergeTable1(t *testing.T) {
	testutil.NeedFileWriter(t)
	const f = "/home/user/doc.txt"
	const dev = "lap-b"
	when := time.Date(2026, 11, 28, 9, 30, 0, 0, time.UTC)
	copyName := files.ConflictName(f, dev, when)
	if copyName != "/home/user/doc (conflicted copy lap-b 2026-11-28 093000).txt" {
		t.Fatalf("conflict name %q", copyName)
	}
	cases := []struct {
		kind        string
		base        bool // the base version has f ("v1")
		here, there fsEdit
		action      string
		want        map[string]string // f and its copy in the merged tree (path → content)
	}{
		{files.CaseAddedElsewhere, false, fsEdit{}, fsEdit{write: map[string]string{f: "theirs"}},
			files.ActTake, map[string]string{f: "theirs"}},
		{files.CaseAddedHere, false, fsEdit{write: map[string]string{f: "mine"}}, fsEdit{},
			files.ActKeep, map[string]string{f: "mine"}},
		{files.CaseDeletedElsewhere, true, fsEdit{}, fsEdit{remove: []string{f}},
			files.ActDelete, map[string]string{}},
		{files.CaseDeletedHere, true, fsEdit{remove: []string{f}}, fsEdit{},
			files.ActKeep, map[string]string{}},
		{files.CaseChangedElsewhere, true, fsEdit{}, fsEdit{write: map[string]string{f: "theirs"}},
			files.ActTake, map[string]string{f: "theirs"}},
		{files.CaseChangedHere, true, fsEdit{write: map[string]string{f: "mine"}}, fsEdit{},
			files.ActKeep, map[string]string{f: "mine"}},
		{files.CaseSameChange, true, fsEdit{write: map[string]string{f: "both"}}, fsEdit{write: map[string]string{f: "both"}},
			files.ActNone, map[string]string{f: "both"}},
		{files.CaseChangedDifferently, true, fsEdit{write: map[string]string{f: "mine"}}, fsEdit{write: map[string]string{f: "theirs"}},
			files.ActBoth, map[string]string{f: "mine", copyName: "theirs"}},
		{files.CaseChangedHereDeleted, true, fsEdit{write: map[string]string{f: "mine"}}, fsEdit{remove: []string{f}},
			files.ActKeep, map[string]string{f: "mine"}},
		{files.CaseDeletedHereChanged, true, fsEdit{remove: []string{f}}, fsEdit{write: map[string]string{f: "theirs"}},
			files.ActTake, map[string]string{f: "theirs"}},
	}
	if len(cases) != 10 {
		t.Fatalf("%d cases", len(cases))
	}
	ctx := context.Background()
	for _, c := range cases {
		t.Run(strings.ReplaceAll(c.kind, " ", "_"), func(t *testing.T) {
			dir := t.TempDir()
			src := filepath.Join(dir, "tree")
			os.MkdirAll(filepath.Join(src, "home/user/keep"), 0o755)
			os.WriteFile(filepath.Join(src, "home/user/keep/same.txt"), []byte("unchanged"), 0o644)
			if c.base {
				os.WriteFile(filepath.Join(src, strings.TrimPrefix(f, "/")), []byte("v1"), 0o644)
			}
			base := testutil.MakeExt4(t, filepath.Join(dir, "base.raw"), src, 32<<20)
			baseQ := filepath.Join(dir, "base.qcow2")
			testutil.Run(t, "qemu-img", "convert", "-f", "raw", "-O", "qcow2", base, baseQ)
			here := edited(t, dir, "here", base, baseQ, c.here)
			there := edited(t, dir, "there", base, baseQ, c.there)
			mb, mh, mt := oneFS(t, baseQ), oneFS(t, here), oneFS(t, there)

			plan := files.SyncMerge(mb.Files, mh.Files, mt.Files, dev, when)
			var got *files.Resolution
			for i, r := range plan.Resolutions {
				if r.Path == f {
					got = &plan.Resolutions[i]
				}
			}
			if got == nil || got.Case != c.kind || got.Action != c.action {
				t.Fatalf("resolution of %s: %+v, want case %q action %q (all: %+v)", f, got, c.kind, c.action, plan.Resolutions)
			}

			merged := filepath.Join(dir, "merged.qcow2")
			testutil.Run(t, "qemu-img", "create", "-q", "-f", "qcow2", "-b", here, "-F", "qcow2", merged)
			src2, err := disk.Open(there, disk.OpenOptions{ReadOnly: true})
			if err != nil {
				t.Fatal(err)
			}
			defer src2.Close()
			rep, err := files.Apply(ctx, files.Source{Img: src2, Start: mt.Start, Size: mt.Size},
				files.Target{Path: merged, Start: mh.Start, Size: mh.Size, TempDir: dir}, plan.Ops)
			if err != nil {
				t.Fatalf("apply %+v: %v", plan.Ops, err)
			}
			if len(rep.Skipped) > 0 || !strings.Contains(rep.Fsck, "files") {
				t.Fatalf("apply: %+v", rep)
			}
			testutil.QemuCheck(t, merged)
			// e2fsck again, independently, on the materialized chain.
			raw := filepath.Join(dir, "merged.raw")
			testutil.Run(t, "qemu-img", "convert", "-O", "raw", merged, raw)
			testutil.Run(t, "e2fsck", "-fn", raw)

			// The model: the unchanged file, and the case's files.
			want := map[string]string{"/home/user/keep/same.txt": sum("unchanged")}
			for p, s := range c.want {
				want[p] = sum(s)
			}
			gotFiles := map[string]string{}
			for _, e := range oneFS(t, merged).Files {
				if e.Type == "file" {
					gotFiles[e.Path] = e.SHA256
				}
			}
			if len(gotFiles) != len(want) {
				t.Fatalf("merged files %v, want %v", gotFiles, want)
			}
			for p, s := range want {
				if gotFiles[p] != s {
					t.Errorf("merged %s: sha256 %q, want %q", p, gotFiles[p], s)
				}
			}
			t.Logf("%s → %s (%d ops, e2fsck: %s)", c.kind, got.Action, len(plan.Ops), rep.Fsck)
		})
	}
}

func TestClassify(t *testing.T) {
	rules, err := files.ParseRules(strings.NewReader("# the defaults, and two more\nsystem /home/*/.cache/**\nuser /home/**\nuser /etc/host*\nsystem /**\n"))
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct{ path, class, rule string }{
		{"/home/u/a.txt", files.ClassUser, "/home/**"},
		{"/home", files.ClassUser, "/home/**"},
		{"/home/u/.cache/x", files.ClassSystem, "/home/*/.cache/**"},
		{"/home/u/.cache", files.ClassSystem, "/home/*/.cache/**"},
		{"/homework", files.ClassSystem, "/**"},
		{"/etc/hostname", files.ClassUser, "/etc/host*"},
		{"/etc/hosts/x", files.ClassSystem, "/**"},
	} {
		class, rule := files.Classify(rules, c.path)
		if class != c.class || rule.Pattern != c.rule {
			t.Errorf("%s: %s by %q, want %s by %q", c.path, class, rule.Pattern, c.class, c.rule)
		}
	}
	if class, _ := files.Classify(nil, "/home/u"); class != files.ClassSystem {
		t.Errorf("no rules: %s", class)
	}
	for _, bad := range []string{"owner /x\n", "user x\n", "user /[\n", "user /a /b\n"} {
		if _, err := files.ParseRules(strings.NewReader(bad)); err == nil {
			t.Errorf("rules %q parsed", bad)
		}
	}
}

// TestApplyHostile: the writer never leaves the target file system. A new
// layer whose /home/user is a symbolic link to / (or ../..) gets no write
// through it (skipped, named); an op with a path that is not clean and
// absolute is refused; a write whose source does not match its manifest
// SHA-256 fails. The target stays e2fsck-clean and the host untouched.
func TestApplyHostile(t *testing.T) {
	testutil.NeedFileWriter(t)
	ctx := context.Background()
	dir := t.TempDir()
	tree := filepath.Join(dir, "tree")
	os.MkdirAll(filepath.Join(tree, "home"), 0o755)
	os.MkdirAll(filepath.Join(tree, "srv"), 0o755)
	os.Symlink("/", filepath.Join(tree, "home", "user"))
	os.Symlink("../..", filepath.Join(tree, "srv", "up"))
	base := testutil.MakeExt4(t, filepath.Join(dir, "base.raw"), tree, 32<<20)
	baseQ := filepath.Join(dir, "base.qcow2")
	testutil.Run(t, "qemu-img", "convert", "-f", "raw", "-O", "qcow2", base, baseQ)
	src := edited(t, dir, "src", base, baseQ, fsEdit{write: map[string]string{"/data.txt": "payload"}})
	fs := oneFS(t, src)
	var data *files.Entry
	for i := range fs.Files {
		if fs.Files[i].Path == "/data.txt" {
			data = &fs.Files[i]
		}
	}
	img, err := disk.Open(src, disk.OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	marker := "cvd-hostile-" + filepath.Base(dir)
	apply := func(ops ...files.Op) (*files.ApplyReport, error) {
		top := filepath.Join(dir, "top.qcow2")
		os.Remove(top)
		testutil.Run(t, "qemu-img", "create", "-q", "-f", "qcow2", "-b", baseQ, "-F", "qcow2", top)
		return files.Apply(ctx, files.Source{Img: img, Start: fs.Start, Size: fs.Size},
			files.Target{Path: top, Start: fs.Start, Size: fs.Size, TempDir: dir}, ops)
	}
	from := func(p string) files.Op {
		e := *data
		e.Path = p
		return files.Op{Kind: files.OpWrite, Path: p, Entry: &e, From: "/data.txt"}
	}
	rep, err := apply(from("/home/user/"+marker), from("/srv/up/"+marker), from("/srv/up/tmp/"+marker))
	if err != nil {
		t.Fatal(err)
	}
	if len(rep.Skipped) != 3 || rep.Written != 0 {
		t.Fatalf("writes through links: %+v", rep)
	}
	for _, p := range []string{"/" + marker, "/tmp/" + marker} {
		if _, err := os.Lstat(p); err == nil {
			os.Remove(p)
			t.Fatalf("the writer wrote %s on the host", p)
		}
	}
	t.Logf("skipped: %+v; e2fsck: %s", rep.Skipped, rep.Fsck)
	for _, p := range []string{"/a/../b", "relative", "/a//b"} {
		if _, err := apply(files.Op{Kind: files.OpRemove, Path: p}); err == nil || !strings.Contains(err.Error(), "not a clean absolute path") {
			t.Errorf("op on %q: %v", p, err)
		}
	}
	bad := from("/copy.txt")
	bad.Entry.SHA256 = strings.Repeat("0", 64)
	if _, err := apply(bad); err == nil || !strings.Contains(err.Error(), "the manifest says") {
		t.Errorf("a source that does not match its manifest: %v", err)
	}
	// Nothing is left mounted or attached.
	if b, _ := os.ReadFile("/proc/self/mountinfo"); strings.Contains(string(b), dir) {
		t.Errorf("a mount is left under %s", dir)
	}
	if out, _ := exec.Command("losetup", "-a").Output(); strings.Contains(string(out), dir) {
		t.Errorf("loop devices left: %s", out)
	}
}
