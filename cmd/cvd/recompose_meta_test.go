package main

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/cvd-project/cvd/desktop"
	"github.com/cvd-project/cvd/files"
	"github.com/cvd-project/cvd/internal/testutil"
)

// A desktop whose file system was written (as a guest does: through a mount)
// over a base, and a new app layer written over the same base: their blocks
// collide in the ext4 metadata. recompose --policy force refuses naming it;
// --force-corrupting-metadata overrides; keep leaves the desktop with its
// conflicts, of which the metadata ones are named; merge moves it by files.
func TestRecomposeForceRefusesMetadataConflicts(t *testing.T) {
	testutil.NeedQemu(t)
	testutil.NeedTool(t, "e2fsprogs", "mkfs.ext4")
	testutil.NeedTool(t, "loop", "mount", "umount")
	dir := t.TempDir()
	store := filepath.Join(dir, "store")
	src := filepath.Join(dir, "tree")
	os.MkdirAll(filepath.Join(src, "etc"), 0o755)
	os.WriteFile(filepath.Join(src, "etc", "hostname"), []byte("desk\n"), 0o644)
	base := testutil.MakeExt4(t, filepath.Join(dir, "base.raw"), src, 128<<20)
	baseQ := filepath.Join(dir, "base.qcow2")
	testutil.Run(t, "qemu-img", "convert", "-f", "raw", "-O", "qcow2", base, baseQ)
	mustCvd(t, store, "layer", "import", baseQ, "--kind", "base", "--name", "os:1")

	written := func(name string, fs map[string]string) string {
		return ext4Written(t, base, filepath.Join(dir, name+".raw"), fs)
	}
	app := written("app", map[string]string{"opt/app/bin": strings.Repeat("app ", 50000)})
	appQ := filepath.Join(dir, "app.qcow2")
	testutil.Run(t, "qemu-img", "convert", "-f", "raw", "-O", "qcow2", "-B", baseQ, "-F", "qcow2", app, appQ)
	mustCvd(t, store, "layer", "import", appQ, "--kind", "app", "--parent", "os:1", "--name", "app:1")

	mustCvd(t, store, "desktop", "create", "d", "--base", "os:1")
	var show struct {
		System string `json:"system_path"`
	}
	json.Unmarshal([]byte(mustCvd(t, store, "--json", "desktop", "show", "d")), &show)
	info := testutil.Run(t, "qemu-img", "info", "--output=json", show.System)
	var bi struct {
		Backing string `json:"backing-filename"`
		Full    string `json:"full-backing-filename"`
	}
	json.Unmarshal([]byte(info), &bi)
	user := written("user", map[string]string{"home/user/report.txt": strings.Repeat("mine ", 20000)})
	os.Remove(show.System)
	testutil.Run(t, "qemu-img", "convert", "-f", "raw", "-O", "qcow2", "-B", bi.Full, "-F", "qcow2", user, show.System)
	testutil.Run(t, "qemu-img", "rebase", "-u", "-b", bi.Backing, "-F", "qcow2", show.System)

	plan := func(args ...string) desktop.DesktopPlan {
		t.Helper()
		out, err := cvdIn(t, store, append([]string{"--json", "recompose", "d", "--app", "app:1", "--dry-run"}, args...)...)
		var rep desktop.RecomposeReport
		if jerr := json.Unmarshal([]byte(out), &rep); jerr != nil || len(rep.Desktops) != 1 {
			t.Fatalf("recompose %v: %v %v\n%s", args, err, jerr, out)
		}
		var ee *exitError
		if p := rep.Desktops[0]; p.Action == desktop.ActionConflict && (!errors.As(err, &ee) || ee.code != exitConflicts) {
			t.Errorf("recompose %v left the desktop with conflicts, exit %v", args, err)
		}
		return rep.Desktops[0]
	}
	p := plan("--policy", "force")
	if p.Action != desktop.ActionConflict || p.Refused == "" || len(p.MetadataConflicts) == 0 {
		t.Fatalf("force on metadata conflicts: action %s, refused %q, %d metadata conflicts", p.Action, p.Refused, len(p.MetadataConflicts))
	}
	kinds := map[string]bool{}
	for _, r := range p.MetadataConflicts {
		kinds[r.What] = true
	}
	if !kinds["superblock"] || !strings.Contains(p.Refused, "superblock") {
		t.Errorf("metadata conflicts %v, refusal %q: the superblock is not named", kinds, p.Refused)
	}
	t.Logf("force refused: %s; %d of %d conflicting bytes are metadata", p.Refused, p.MetadataConflictBytes, p.ConflictBytes)
	if k := plan("--policy", "keep"); k.Action != desktop.ActionConflict || len(k.MetadataConflicts) == 0 || k.Refused != "" {
		t.Errorf("keep: action %s, %d metadata conflicts, refused %q", k.Action, len(k.MetadataConflicts), k.Refused)
	}
	// The conflicts as files: the desktop's file and the app's, whose blocks
	// the same clusters hold.
	cf := map[string]desktop.ConflictFile{}
	for _, f := range p.ConflictFiles {
		cf[f.Path] = f
	}
	if cf["/home/user/report.txt"].DesktopBytes == 0 || cf["/opt/app/bin"].LayerBytes == 0 {
		t.Errorf("conflicts as files: %+v", p.ConflictFiles)
	}
	t.Logf("conflicts as files: %+v", p.ConflictFiles)
	if f := plan("--policy", "force", "--force-corrupting-metadata"); f.Action != desktop.ActionMove {
		t.Errorf("force with the override: action %s", f.Action)
	}
	// The text report names it too.
	out, _ := cvdIn(t, store, "recompose", "d", "--app", "app:1", "--dry-run", "--policy", "force")
	if !strings.Contains(out, "of which file-system metadata: superblock") || !strings.Contains(out, "force refused") ||
		!strings.Contains(out, "as files: ") || !strings.Contains(out, "/home/user/report.txt (desktop ") {
		t.Errorf("the report:\n%s", out)
	}

	// A file system whose journal needs recovery (a desktop not shut down
	// cleanly) is not merged: its manifest would miss what the journal holds.
	dirty := filepath.Join(dir, "dirty.raw")
	testutil.Run(t, "cp", "--sparse=always", user, dirty)
	testutil.Run(t, "debugfs", "-w", "-R", "feature needs_recovery", dirty)
	saved := show.System + ".saved"
	os.Rename(show.System, saved)
	testutil.Run(t, "qemu-img", "convert", "-f", "raw", "-O", "qcow2", "-B", bi.Full, "-F", "qcow2", dirty, show.System)
	testutil.Run(t, "qemu-img", "rebase", "-u", "-b", bi.Backing, "-F", "qcow2", show.System)
	if r := plan("--policy", "merge"); r.Action != desktop.ActionConflict || !strings.Contains(r.Refused, "not cleanly unmounted") {
		t.Errorf("merge of a file system that needs recovery: action %s, refused %q", r.Action, r.Refused)
	}
	os.Rename(saved, show.System)

	// Policy merge moves it by files: the desktop's file onto the app layer.
	m := plan("--policy", "merge")
	if m.Action != desktop.ActionMerge || len(m.Files) != 1 || m.Files[0].Writes != 1 || m.Refused != "" {
		t.Fatalf("merge plan: action %s, refused %q, files %+v", m.Action, m.Refused, m.Files)
	}
	var rep desktop.RecomposeReport
	if err := json.Unmarshal([]byte(mustCvd(t, store, "--json", "recompose", "d", "--app", "app:1", "--policy", "merge")), &rep); err != nil {
		t.Fatal(err)
	}
	if rep.Merged != 1 || !rep.Desktops[0].Applied || rep.Desktops[0].Files[0].Applied == nil {
		t.Fatalf("merge: %+v", rep)
	}
	t.Logf("merged: %+v; e2fsck: %s", rep.Desktops[0].Files[0], rep.Desktops[0].Files[0].Applied.Fsck)
	json.Unmarshal([]byte(mustCvd(t, store, "--json", "desktop", "show", "d")), &show)
	raw := filepath.Join(dir, "merged.raw")
	testutil.Run(t, "qemu-img", "convert", "-O", "raw", show.System, raw)
	testutil.Run(t, "e2fsck", "-fn", raw)
	// The merged tree is the new head version's layer.
	var fss []files.FileSystem
	if err := json.Unmarshal([]byte(mustCvd(t, store, "--json", "desktop", "files", "d")), &fss); err != nil || len(fss) != 1 {
		t.Fatalf("desktop files: %v %+v", err, fss)
	}
	got := map[string]string{}
	for _, e := range fss[0].Files {
		got[e.Path] = e.SHA256
	}
	for p, s := range map[string]string{"/opt/app/bin": strings.Repeat("app ", 50000), "/home/user/report.txt": strings.Repeat("mine ", 20000), "/etc/hostname": "desk\n"} {
		if h := sha256.Sum256([]byte(s)); got[p] != hex.EncodeToString(h[:]) {
			t.Errorf("after the merge %s: sha256 %q", p, got[p])
		}
	}
}

// ext4Written copies the raw ext4 image base to out, writes files (path →
// content) into the copy through a loop mount (the kernel writes, as a guest
// does) and removes the paths rm.
func ext4Written(t *testing.T, base, out string, fs map[string]string, rm ...string) string {
	t.Helper()
	testutil.Run(t, "cp", "--sparse=always", base, out)
	mnt := t.TempDir()
	testutil.Run(t, "mount", "-o", "loop", out, mnt)
	defer testutil.Run(t, "umount", mnt)
	for p, s := range fs {
		os.MkdirAll(filepath.Dir(filepath.Join(mnt, p)), 0o755)
		if err := os.WriteFile(filepath.Join(mnt, p), []byte(s), 0o644); err != nil {
			t.Error(err)
		}
	}
	for _, p := range rm {
		if err := os.Remove(filepath.Join(mnt, p)); err != nil {
			t.Error(err)
		}
	}
	return out
}
