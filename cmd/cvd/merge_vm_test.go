package main

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/cvd-project/cvd/desktop"
	"github.com/cvd-project/cvd/files"
	"github.com/cvd-project/cvd/internal/testutil"
)

// TestMergeGuest: a desktop on an ext4 base and app layer boots (the tiny
// guest mounts its system disk as ext4) and writes and removes files through
// the guest kernel; its check-in lands them on the server. The administrator
// publishes a new app layer; recompose --policy force is refused with the
// metadata conflict named; --policy merge moves the desktop by files:
// e2fsck -fn is clean on its new head, the next boot (on a new check-out)
// finds the new app's files and the desktop's own, with their checksums, and
// where both changed a path, the rules' winner (the layer for /etc, the
// desktop for /home).
func TestMergeGuest(t *testing.T) {
	env := setupVMEnv(t)
	testutil.NeedFileWriter(t)
	bin := buildCvd(t)
	work := t.TempDir()
	srv := filepath.Join(work, "server")
	ctx, cancel := context.WithTimeout(context.Background(), 8*time.Minute)
	defer cancel()

	// os:1, and app:1 and app:2 captured on it (written through the kernel).
	tree := filepath.Join(work, "tree")
	os.MkdirAll(filepath.Join(tree, "etc"), 0o755)
	os.MkdirAll(filepath.Join(tree, "home", "user"), 0o755)
	os.WriteFile(filepath.Join(tree, "etc", "hostname"), []byte("desk\n"), 0o644)
	base := testutil.MakeExt4(t, filepath.Join(work, "base.raw"), tree, 64<<20)
	baseQ := filepath.Join(work, "base.qcow2")
	testutil.Run(t, "qemu-img", "convert", "-f", "raw", "-O", "qcow2", base, baseQ)
	mustCvd(t, srv, "layer", "import", baseQ, "--kind", "base", "--name", "os:1")
	layer := func(name string, fs map[string]string) {
		raw := ext4Written(t, base, filepath.Join(work, name+".raw"), fs)
		q := filepath.Join(work, name+".qcow2")
		testutil.Run(t, "qemu-img", "convert", "-f", "raw", "-O", "qcow2", "-B", baseQ, "-F", "qcow2", raw, q)
		mustCvd(t, srv, "layer", "import", q, "--kind", "app", "--parent", "os:1", "--name", name)
	}
	app1 := map[string]string{"/opt/app/bin": strings.Repeat("app 1 ", 30000), "/etc/app.conf": "version 1\n", "/opt/app/old.txt": "old"}
	app2 := map[string]string{"/opt/app/bin": strings.Repeat("app 2 ", 40000), "/etc/app.conf": "version 2\n", "/opt/app/old.txt": "old",
		"/opt/app/v2.txt": "new in 2\n", "/home/user/.apprc": "the layer's defaults\n"}
	layer("app:1", app1)

	show := []string{"/home/user/notes.txt", "/etc/app.conf", "/home/user/.apprc", "/opt/app/bin", "/opt/app/v2.txt", "/opt/app/old.txt"}
	write := []string{"/home/user/notes.txt", "/etc/app.conf", "/home/user/.apprc"}
	mustCvd(t, srv, "desktop", "create", "desk", "--app", "app:1", "--user-size", "32M")
	mustCvd(t, srv, "desktop", "boot", "desk", "--kernel", env.kernel, "--initrd", env.initrd, "--memory", "256",
		"--cmdline", env.cmdline+" cvd.seed=/dev/vdc cvd.fs=1 cvd.fs_show="+strings.Join(show, ",")+
			" cvd.fs_write="+strings.Join(write, ",")+" cvd.fs_rm=/opt/app/old.txt")
	p := startServeAt(t, bin, srv, "127.0.0.1:0")
	conn := deskConn(ctx, t, env.uri)
	var added struct {
		Token string `json:"token"`
	}
	json.Unmarshal([]byte(mustCvd(t, srv, "--json", "device", "add", "lap", "--desktop", "desk")), &added)
	d := &groupDevice{t: t, bin: bin, store: filepath.Join(work, "lap"), uri: env.uri, token: added.Token, conn: conn}

	// shown boots the guest and returns the checksums it printed (path → sha256, "" missing).
	shown := func() map[string]string {
		t.Helper()
		log := d.runGuest(ctx)
		if !strings.Contains(log, "cvd-guest: fs unmounted") || strings.Contains(log, "cvd-guest: error") {
			t.Fatalf("the guest:\n%s", log)
		}
		out := map[string]string{}
		for _, m := range regexp.MustCompile(`cvd-guest: (sha256 ([0-9a-f]{64})|missing) (\S+)`).FindAllStringSubmatch(log, -1) {
			out[m[3]] = m[2]
		}
		if len(out) != len(show) {
			t.Fatalf("the guest showed %v:\n%s", out, log)
		}
		return out
	}
	sum := func(s string) string {
		h := sha256.Sum256([]byte(s))
		return hex.EncodeToString(h[:])
	}
	guest := func(p string) string { return sum(strings.Repeat("written by the guest: "+p+"\n", 1000)) }

	d.must(nil, "--json", "checkout", "desk", "--server", p.url)
	first := shown()
	if first["/opt/app/bin"] != sum(app1["/opt/app/bin"]) || first["/home/user/notes.txt"] != "" || first["/opt/app/old.txt"] != sum("old") {
		t.Fatalf("first boot: %v", first)
	}
	d.must(nil, "--json", "checkin", "desk", "--release")

	// The new app layer; force is refused on the metadata, merge moves by files.
	layer("app:2", app2)
	out, err := cvdIn(t, srv, "recompose", "desk", "--app", "app:2", "--policy", "force", "--dry-run")
	var ee *exitError
	if !errors.As(err, &ee) || ee.code != exitConflicts || !strings.Contains(out, "force refused") || !strings.Contains(out, "superblock") {
		t.Fatalf("force: %v\n%s", err, out)
	}
	var rep desktop.RecomposeReport
	if err := json.Unmarshal([]byte(mustCvd(t, srv, "--json", "recompose", "desk", "--app", "app:2", "--policy", "merge")), &rep); err != nil {
		t.Fatal(err)
	}
	if rep.Merged != 1 || len(rep.Desktops[0].Files) != 1 || rep.Desktops[0].Files[0].Applied == nil {
		t.Fatalf("merge: %+v", rep)
	}
	fm := rep.Desktops[0].Files[0]
	winners := map[string]string{}
	for _, o := range fm.Overridden {
		winners[o.Path] = o.Winner
	}
	if winners["/etc/app.conf"] != "layer" || winners["/home/user/.apprc"] != "desktop" || len(winners) != 2 {
		t.Errorf("overridden: %+v", fm.Overridden)
	}
	t.Logf("merge: %d written (%d bytes), %d made, %d removed; overridden %v; e2fsck: %s",
		fm.Writes, fm.Bytes, fm.Makes, fm.Removes, winners, fm.Applied.Fsck)

	// e2fsck on the new head, independently of the merge's own check.
	var head struct {
		System string `json:"system_path"`
	}
	json.Unmarshal([]byte(mustCvd(t, srv, "--json", "desktop", "show", "desk")), &head)
	raw := filepath.Join(work, "head.raw")
	testutil.Run(t, "qemu-img", "convert", "-O", "raw", head.System, raw)
	testutil.Run(t, "e2fsck", "-fn", raw)
	var fss []files.FileSystem
	json.Unmarshal([]byte(mustCvd(t, srv, "--json", "desktop", "files", "desk")), &fss)

	// The desktop boots on its new chain with both sides' files.
	d.must(nil, "--json", "checkout", "desk", "--server", p.url)
	second := shown()
	want := map[string]string{
		"/home/user/notes.txt": guest("/home/user/notes.txt"), // the desktop's own
		"/home/user/.apprc":    guest("/home/user/.apprc"),    // both: a user path, the desktop's
		"/etc/app.conf":        sum(app2["/etc/app.conf"]),    // both: a system path, the layer's
		"/opt/app/bin":         sum(app2["/opt/app/bin"]),     // the new app's
		"/opt/app/v2.txt":      sum(app2["/opt/app/v2.txt"]),
		"/opt/app/old.txt":     "", // removed by the desktop
	}
	for p, s := range want {
		if second[p] != s {
			t.Errorf("after the merge the guest sees %s: %q, want %q", p, second[p], s)
		}
	}
	listed := map[string]string{}
	for _, e := range fss[0].Files {
		listed[e.Path] = e.SHA256
	}
	for p, s := range want {
		if listed[p] != s {
			t.Errorf("desktop files after the merge %s: %q, want %q", p, listed[p], s)
		}
	}
}
