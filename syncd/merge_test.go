package syncd

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/cvd-project/cvd/desktop"
	"github.com/cvd-project/cvd/disk"
	"github.com/cvd-project/cvd/files"
	"github.com/cvd-project/cvd/internal/testutil"
	"github.com/cvd-project/cvd/syncd/laptop"
	"github.com/cvd-project/cvd/syncd/proto"
)

// editUserFiles changes a laptop's user disk as its guest would: the chain
// materialized, the files written and removed through a loop mount (the
// kernel's ext4), and every 64 KiB that differs written back into the top.
func (l *testLaptop) editUserFiles(name string, put map[string]string, remove ...string) {
	t := l.t
	t.Helper()
	top := l.top(name, proto.DiskUser)
	raw := filepath.Join(t.TempDir(), "user.raw")
	testutil.Run(t, "qemu-img", "convert", "-O", "raw", top, raw)
	before, err := os.ReadFile(raw)
	if err != nil {
		t.Fatal(err)
	}
	mnt := t.TempDir()
	testutil.Run(t, "mount", "-o", "loop", raw, mnt)
	for p, s := range put {
		os.MkdirAll(filepath.Dir(filepath.Join(mnt, p)), 0o755)
		if err := os.WriteFile(filepath.Join(mnt, p), []byte(s), 0o644); err != nil {
			t.Error(err)
		}
	}
	for _, p := range remove {
		if err := os.Remove(filepath.Join(mnt, p)); err != nil {
			t.Error(err)
		}
	}
	testutil.Run(t, "umount", mnt)
	after, err := os.ReadFile(raw)
	if err != nil {
		t.Fatal(err)
	}
	const chunk = 64 << 10
	var ws []write
	for off := 0; off < len(after); off += chunk {
		if !bytes.Equal(before[off:off+chunk], after[off:off+chunk]) {
			ws = append(ws, write{off: int64(off), data: after[off : off+chunk]})
		}
	}
	l.writeAt(name, proto.DiskUser, ws)
}

// TestUserFilesMerged: two devices change the user disk (ext4) of one desktop
// from the same version, every case of the seed's Table 1 at once, one file
// per case. A (active) checks in first and moves the head; B's user push does
// not start from the head: the server merges the files by the table onto B's
// tree, and the merged version is the new head. Each path's resolution is
// the table's, e2fsck -fn is clean on the merged disk, its files match the
// model, and both devices' versions stay in the history (nothing is lost).
func TestUserFilesMerged(t *testing.T) {
	testutil.NeedFileWriter(t)
	ctx := context.Background()
	dir := t.TempDir()
	tree := filepath.Join(dir, "tree")
	names := []string{"del-else", "del-here", "chg-else", "chg-here", "same", "diff", "chg-here-del-else", "del-here-chg-else", "keep"}
	os.MkdirAll(filepath.Join(tree, "home", "user"), 0o755)
	for _, n := range names {
		os.WriteFile(filepath.Join(tree, "home", "user", n+".txt"), []byte("v1 of "+n+"\n"), 0o644)
	}
	raw := testutil.MakeExt4(t, filepath.Join(dir, "user.raw"), tree, 32*MiB)
	b, err := os.ReadFile(raw)
	if err != nil {
		t.Fatal(err)
	}
	const chunk = 64 << 10
	var userWrites []write
	for off := 0; off < len(b); off += chunk {
		if !bytes.Equal(b[off:off+chunk], make([]byte, chunk)) {
			userWrites = append(userWrites, write{off: int64(off), data: b[off : off+chunk]})
		}
	}
	w := newWorld(t, worldSpec{baseSize: 64 * MiB, baseWrites: []write{{off: 0, data: testutil.Fill(1, 1*MiB, false)}},
		userSize: 32 * MiB, userWrites: userWrites})
	_, tokB, err := w.srv.AddDevice("lap-b", DeviceOptions{Desktops: []string{w.desktop}})
	if err != nil {
		t.Fatal(err)
	}
	cA, cB := w.client(w.token), w.client(tokB)
	lapA, lapB := newLaptop(t, "a"), newLaptop(t, "b")
	if rep, err := lapA.lp.Open(ctx, cA, w.desktop, laptop.OpenOptions{}); err != nil || rep.Checkout == nil {
		t.Fatalf("A opens: %+v %v", rep, err)
	}
	if _, err := lapB.lp.Follow(ctx, cB, w.desktop, laptop.FollowOptions{}); err != nil {
		t.Fatal(err)
	}
	commonN, _ := w.head()

	f := func(n string) string { return "/home/user/" + n + ".txt" }
	lapA.editUserFiles(w.desktop, map[string]string{
		f("added-else"): "A added", f("chg-else"): "A changed", f("same"): "both changed",
		f("diff"): "A's change", f("del-here-chg-else"): "A changed it",
	}, f("del-else"), f("chg-here-del-else"))
	ciA, err := lapA.lp.CheckIn(ctx, w.desktop, laptop.CheckinOptions{})
	if err != nil || ciA.Conflict || ciA.Merge != nil {
		t.Fatalf("A checks in: %+v %v", ciA, err)
	}
	lapB.editUserFiles(w.desktop, map[string]string{
		f("added-here"): "B added", f("chg-here"): "B changed", f("same"): "both changed",
		f("diff"): "B's change", f("chg-here-del-else"): "B changed it",
	}, f("del-here"), f("del-here-chg-else"))
	ciB, err := lapB.lp.CheckIn(ctx, w.desktop, laptop.CheckinOptions{UserOnly: true})
	if err != nil || !ciB.Conflict || ciB.Merge == nil || ciB.Head != ciB.Merge.Version {
		t.Fatalf("B checks in: %+v %v", ciB, err)
	}

	// The table, from B's side (the merge builds on B's tree).
	_, head := w.head()
	d, err := w.store.Desktop(w.desktop)
	if err != nil {
		t.Fatal(err)
	}
	aVersion := d.Versions[len(d.Versions)-3] // A's check-in, B's conflict, the merge
	copyName := files.ConflictName(f("diff"), "laptop1", aVersion.Created)
	want := []struct {
		name, kind, action, copy string
	}{
		{"added-else", files.CaseAddedElsewhere, files.ActTake, ""},
		{"added-here", files.CaseAddedHere, files.ActKeep, ""},
		{"del-else", files.CaseDeletedElsewhere, files.ActDelete, ""},
		{"del-here", files.CaseDeletedHere, files.ActKeep, ""},
		{"chg-else", files.CaseChangedElsewhere, files.ActTake, ""},
		{"chg-here", files.CaseChangedHere, files.ActKeep, ""},
		{"same", files.CaseSameChange, files.ActNone, ""},
		{"diff", files.CaseChangedDifferently, files.ActBoth, copyName},
		{"chg-here-del-else", files.CaseChangedHereDeleted, files.ActKeep, ""},
		{"del-here-chg-else", files.CaseDeletedHereChanged, files.ActTake, ""},
	}
	got := map[string]proto.MergeResolution{}
	for _, r := range ciB.Merge.Resolutions {
		got[r.Path] = r
	}
	for _, c := range want {
		r := got[f(c.name)]
		if r.Case != c.kind || r.Action != c.action || r.Copy != c.copy {
			t.Errorf("%s: %+v, want case %q action %q copy %q", f(c.name), r, c.kind, c.action, c.copy)
		}
	}
	t.Logf("merged version %d (from A's %d and B's %d over %d): %d resolutions, e2fsck %v",
		ciB.Merge.Version, ciA.Version, ciB.Version, commonN, len(ciB.Merge.Resolutions), ciB.Merge.Fsck)

	// The merged disk: e2fsck clean, the model's files.
	if head.Kind != "merge" || head.System != ciA.Layers[proto.DiskSystem] {
		t.Fatalf("head %+v", head)
	}
	mraw := filepath.Join(dir, "merged.raw")
	testutil.Run(t, "qemu-img", "convert", "-O", "raw", w.store.LayerPath(head.User), mraw)
	if out, err := exec.Command("e2fsck", "-fn", mraw).CombinedOutput(); err != nil {
		t.Fatalf("e2fsck -fn on the merged user disk: %v\n%s", err, out)
	}
	model := map[string]string{
		f("keep"): "v1 of keep\n", f("added-else"): "A added", f("added-here"): "B added", f("chg-else"): "A changed",
		f("chg-here"): "B changed", f("same"): "both changed", f("diff"): "B's change", copyName: "A's change",
		f("chg-here-del-else"): "B changed it", f("del-here-chg-else"): "A changed it",
	}
	fss, err := desktop.VersionFiles(ctx, w.store, w.desktop, 0, desktop.DiskUser)
	if err != nil {
		t.Fatal(err)
	}
	have := map[string]string{}
	for _, e := range fss[0].Files {
		if e.Type == "file" {
			have[e.Path] = e.SHA256
		}
	}
	if len(have) != len(model) {
		t.Errorf("merged files %d, model %d: %v", len(have), len(model), have)
	}
	for p, s := range model {
		if h := sha256.Sum256([]byte(s)); have[p] != hex.EncodeToString(h[:]) {
			t.Errorf("merged %s: %q", p, have[p])
		}
	}
	// Nothing is lost: B's own tree is its conflict version, A's its check-in.
	if v := d.Versions[len(d.Versions)-2]; v.N != ciB.Version || !v.Conflict || v.User != ciB.Layers[proto.DiskUser] {
		t.Errorf("B's conflict version: %+v", v)
	}
	img, err := disk.Open(w.store.LayerPath(ciB.Layers[proto.DiskUser]), disk.OpenOptions{ReadOnly: true, AllowedRoots: []string{w.dir}})
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	bm, err := files.Manifest(ctx, img)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range bm[0].Files {
		if e.Path == f("del-here-chg-else") {
			t.Errorf("B's own version holds %s, which B removed", e.Path)
		}
	}
}
