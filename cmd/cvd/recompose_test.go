package main

import (
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/cvd-project/cvd/images"
	"github.com/cvd-project/cvd/internal/testutil"
)

// recomposeFixture: base (os:1), office:1 and office:2 on it, and desktops:
// alice (a delta that does not collide with office:2), bob (one that does),
// carol (no delta), vera (on a version layer of her own, with a delta).
func recomposeFixture(t *testing.T) (dir, store string) {
	t.Helper()
	testutil.NeedQemu(t)
	dir = t.TempDir()
	store = filepath.Join(dir, "store")
	storeImages(t, store)
	q := func(args ...string) { t.Helper(); testutil.Run(t, "qemu-img", args...) }
	io := func(img string, cmds ...string) {
		t.Helper()
		args := []string{}
		for _, c := range cmds {
			args = append(args, "-c", c)
		}
		testutil.Run(t, "qemu-io", append(args, img)...)
	}
	base, o1, o2, v1 := filepath.Join(dir, "base.qcow2"), filepath.Join(dir, "o1.qcow2"), filepath.Join(dir, "o2.qcow2"), filepath.Join(dir, "v1.qcow2")
	q("create", "-q", "-f", "qcow2", base, "128M")
	io(base, "write -P 1 0 16M")
	q("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", o1)
	io(o1, "write -P 2 32M 4M")
	q("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", o2)
	io(o2, "write -P 3 32M 2M", "write -P 2 34M 2M", "write -P 4 64M 2M")
	q("create", "-q", "-f", "qcow2", "-b", "o1.qcow2", "-F", "qcow2", v1)
	io(v1, "write -P 5 80M 1M")
	mustCvd(t, store, "layer", "import", base, "--kind", "base", "--name", "os:1")
	mustCvd(t, store, "layer", "import", o1, "--kind", "app", "--parent", "os:1", "--name", "office:1")
	mustCvd(t, store, "layer", "import", o2, "--kind", "app", "--parent", "os:1", "--name", "office:2")
	mustCvd(t, store, "layer", "import", v1, "--kind", "version", "--parent", "office:1", "--name", "vera:1")
	for _, d := range []string{"alice", "bob", "carol"} {
		mustCvd(t, store, "desktop", "create", d, "--app", "office:1", "--user-size", "16M")
	}
	mustCvd(t, store, "desktop", "create", "vera", "--app", "office:1", "--app", "vera:1")
	top := func(d string) string { return filepath.Join(store, "desktops", d+".system.qcow2") }
	io(top("alice"), "write -P 6 100M 1M")
	io(top("bob"), "write -P 7 33M 64K")
	io(top("vera"), "write -P 8 90M 1M", "write -P 9 32M 64K")
	return dir, store
}

type recomposeJSON struct {
	Desktops []struct {
		Desktop   string `json:"desktop"`
		Action    string `json:"action"`
		Conflicts int64  `json:"conflict-clusters"`
		Applied   bool   `json:"applied"`
		Error     string `json:"error"`
		Cost      struct {
			WriteBytes int64 `json:"write-bytes"`
		} `json:"cost"`
	} `json:"desktops"`
	LowerDiffs int `json:"lower-diffs"`
}

func TestRecomposeDryRunCLI(t *testing.T) {
	_, store := recomposeFixture(t)
	out, err := cvdIn(t, store, "--json", "recompose", "--using", "office:1", "--app", "office:2", "--dry-run")
	if exitCode(err) != exitConflicts {
		t.Fatalf("dry run with a conflict: exit %d (%v)\n%s", exitCode(err), err, out)
	}
	var rep recomposeJSON
	if err := json.Unmarshal([]byte(out), &rep); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	want := map[string]string{"alice": "move", "bob": "conflict", "carol": "move", "vera": "conflict"}
	if len(rep.Desktops) != 4 || rep.LowerDiffs != 1 {
		t.Fatalf("%s", out)
	}
	for _, d := range rep.Desktops {
		if d.Action != want[d.Desktop] || d.Applied {
			t.Errorf("%s: %s (applied %v), want %s", d.Desktop, d.Action, d.Applied, want[d.Desktop])
		}
		if d.Desktop == "bob" && d.Conflicts != 1 || d.Desktop == "vera" && d.Conflicts != 1 {
			t.Errorf("%s: %d conflicts, want 1", d.Desktop, d.Conflicts)
		}
	}
	human, _ := cvdIn(t, store, "recompose", "alice", "bob", "--app", "office:2", "--dry-run")
	for _, w := range []string{"dry run", "conflicts of bob: 33 MiB+64 KiB", "1 to move"} {
		if !strings.Contains(human, w) {
			t.Errorf("human report lacks %q:\n%s", w, human)
		}
	}
	// A dry run changes nothing.
	d, err := images.Open(store, images.OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	ds, _ := d.Desktops()
	for _, x := range ds {
		if x.Head != 1 {
			t.Fatalf("%s moved in a dry run", x.Name)
		}
	}
}

func TestRecomposeUsage(t *testing.T) {
	store := filepath.Join(t.TempDir(), "store")
	for _, args := range [][]string{
		{"recompose", "--app", "x"},
		{"recompose", "a", "--using", "l", "--app", "x"},
		{"recompose", "a"},
		{"recompose", "a", "--app", "x", "--policy", "rebase"},
		{"recompose", "a", "--app", "x", "--rules", "r.txt"},
		{"desktop", "squash", "a", "--keep", "-1"},
		{"desktop", "squash"},
	} {
		if _, err := cvdIn(t, store, args...); exitCode(err) != exitUsage {
			t.Errorf("cvd %s: exit %d (%v), want %d", strings.Join(args, " "), exitCode(err), err, exitUsage)
		}
	}
}

func TestSquashDryRunCLI(t *testing.T) {
	_, store := recomposeFixture(t)
	out := mustCvd(t, store, "desktop", "squash", "vera", "--keep", "0", "--dry-run")
	if !strings.Contains(out, "nothing to merge") {
		t.Fatalf("one version layer: %s", out)
	}
}

// flatOf flattens the guest view of a store-relative top with qemu-img.
func flatOf(t *testing.T, store, rel, out string) string {
	t.Helper()
	testutil.Run(t, "qemu-img", "convert", "-O", "qcow2", filepath.Join(store, rel), out)
	return out
}

// TestRecomposeCrash SIGKILLs `cvd recompose` at random moments. After each kill
// every desktop must open on a complete chain that is either its old one (showing
// what it showed before) or its new one (showing its delta over office:2), the
// store must check clean and every sealed layer verify. The last run finishes.
func TestRecomposeCrash(t *testing.T) {
	dir, store := recomposeFixture(t)
	bin := buildCvd(t)
	seedv := uint64(time.Now().UnixNano())
	t.Logf("seed %d", seedv)
	rng := rand.New(rand.NewPCG(seedv, 1))

	// Expected views: old (as now) and new (the delta over office:2).
	st, err := images.Open(store, images.OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	o2, _ := st.Resolve("office:2")
	desks, _ := st.Desktops()
	oldView, newView := map[string]string{}, map[string]string{}
	for _, d := range desks {
		oldView[d.Name] = flatOf(t, store, d.SystemDisk, filepath.Join(dir, d.Name+".old.qcow2"))
		// New view: copies of the desktop's own layers, unsafely rebased with qemu-img.
		chain, _ := st.Chain(d.HeadVersion().System)
		below := st.LayerPath(o2)
		for i := len(chain) - 1; i >= 0; i-- {
			if chain[i].Kind != images.KindVersion {
				continue
			}
			cp := filepath.Join(dir, d.Name+".v"+chain[i].ID[:8]+".qcow2")
			testutil.Run(t, "cp", st.LayerPath(chain[i].ID), cp)
			os.Chmod(cp, 0o644)
			testutil.Run(t, "qemu-img", "rebase", "-u", "-b", below, "-F", "qcow2", cp)
			below = cp
		}
		cp := filepath.Join(dir, d.Name+".top.qcow2")
		testutil.Run(t, "cp", st.Path(d.SystemDisk), cp)
		testutil.Run(t, "qemu-img", "rebase", "-u", "-b", below, "-F", "qcow2", cp)
		newView[d.Name] = filepath.Join(dir, d.Name+".new.qcow2")
		testutil.Run(t, "qemu-img", "convert", "-O", "qcow2", cp, newView[d.Name])
	}
	st.Close()

	check := func(round int) (moved int) {
		t.Helper()
		st, err := images.Open(store, images.OpenOptions{})
		if err != nil {
			t.Fatalf("round %d: open store: %v", round, err)
		}
		defer st.Close()
		rep, err := st.Check(context.Background(), images.CheckOptions{})
		if err != nil || !rep.OK() {
			t.Fatalf("round %d: store check: %v %v", round, err, rep)
		}
		res, err := st.Verify(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		for _, r := range res {
			if !r.OK {
				t.Fatalf("round %d: layer %s changed: %v", round, r.ID, r.Problems)
			}
		}
		ds, _ := st.Desktops()
		for _, d := range ds {
			top := st.Path(d.SystemDisk)
			out := testutil.Run(t, "qemu-img", "info", "--backing-chain", top)
			if !strings.Contains(out, d.HeadVersion().System) {
				t.Fatalf("round %d: %s's top does not stand on its head layer %s:\n%s", round, d.Name, d.HeadVersion().System, out)
			}
			chain, _ := st.Chain(d.HeadVersion().System)
			onNew := false
			for _, l := range chain {
				onNew = onNew || l.ID == o2
			}
			want := oldView[d.Name]
			if onNew {
				want = newView[d.Name]
				moved++
			}
			if !testutil.QemuCompare(t, top, want) {
				t.Fatalf("round %d: %s (on new layers: %v) shows neither its old nor its new chain", round, d.Name, onNew)
			}
		}
		return moved
	}

	for round := 0; ; round++ {
		cmd := exec.Command(bin, "--store", store, "recompose", "--using", "office:1", "--app", "office:2", "--policy", "force", "--workers", "1")
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		done := make(chan error, 1)
		go func() { done <- cmd.Wait() }()
		delay := time.Duration(rng.IntN(400)) * time.Millisecond
		var err error
		killed := false
		select {
		case err = <-done:
		case <-time.After(delay):
			cmd.Process.Signal(syscall.SIGKILL)
			err = <-done
			killed = true
		}
		moved := check(round)
		t.Logf("round %d: killed after %v: %v; %d of %d desktops on the new chain", round, delay, killed, moved, len(desks))
		if !killed {
			if err != nil {
				t.Fatalf("recompose: %v", err)
			}
			if moved != len(desks) {
				t.Fatalf("recompose finished with %d of %d desktops moved", moved, len(desks))
			}
			return
		}
		if round > 40 {
			t.Fatal(fmt.Sprintf("recompose never finished in %d rounds", round))
		}
	}
}

// TestOverlayCommandsDocumented: the overlay commands have a usage line, examples,
// exit codes in their help and an argument validator.
func TestOverlayCommandsDocumented(t *testing.T) {
	for _, path := range [][]string{
		{"disk", "rebase"}, {"disk", "diff"}, {"disk", "commit"}, {"disk", "flatten"},
		{"recompose"}, {"desktop", "squash"},
	} {
		c, _, err := newRootCommand().Find(path)
		if err != nil || c.Name() != path[len(path)-1] {
			t.Errorf("cvd %s: not registered (%v)", strings.Join(path, " "), err)
			continue
		}
		if c.Example == "" || c.Args == nil || c.RunE == nil || c.Short == "" || !strings.Contains(c.Long, "Exit codes:") {
			t.Errorf("cvd %s: needs Short, Long with exit codes, Example, Args and RunE", strings.Join(path, " "))
		}
	}
}

// TestSquashCrash SIGKILLs `cvd desktop squash` at random moments: the desktop
// must open on a complete chain that shows what it showed before, either the old
// chain or the squashed one; the store checks clean and every layer verifies.
func TestSquashCrash(t *testing.T) {
	dir, store := recomposeFixture(t)
	// vic: office:1 → three version layers of her own → a top with data.
	parent := "office:1"
	for i := 1; i <= 3; i++ {
		v := filepath.Join(dir, fmt.Sprintf("vic%d.qcow2", i))
		testutil.Run(t, "qemu-img", "create", "-q", "-f", "qcow2", v, "128M")
		testutil.Run(t, "qemu-io", "-c", fmt.Sprintf("write -P %d %dM 2M", 0x60+i, 40+i), v)
		mustCvd(t, store, "layer", "import", v, "--kind", "version", "--parent", parent, "--name", fmt.Sprintf("vic:%d", i))
		parent = fmt.Sprintf("vic:%d", i)
	}
	mustCvd(t, store, "desktop", "create", "vic", "--app", "office:1", "--app", "vic:1", "--app", "vic:2", "--app", "vic:3")
	testutil.Run(t, "qemu-io", "-c", "write -P 0x70 41M 1M", filepath.Join(store, "desktops", "vic.system.qcow2"))
	view := flatOf(t, store, "desktops/vic.system.qcow2", filepath.Join(dir, "vic.view.qcow2"))
	bin := buildCvd(t)
	seedv := uint64(time.Now().UnixNano())
	t.Logf("seed %d", seedv)
	rng := rand.New(rand.NewPCG(seedv, 2))
	for round := 0; ; round++ {
		cmd := exec.Command(bin, "--store", store, "desktop", "squash", "vic", "--keep", "1")
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		done := make(chan error, 1)
		go func() { done <- cmd.Wait() }()
		delay := time.Duration(rng.IntN(250)) * time.Millisecond
		killed := false
		var err error
		select {
		case err = <-done:
		case <-time.After(delay):
			cmd.Process.Signal(syscall.SIGKILL)
			err = <-done
			killed = true
		}
		st, oerr := images.Open(store, images.OpenOptions{})
		if oerr != nil {
			t.Fatal(oerr)
		}
		rep, cerr := st.Check(context.Background(), images.CheckOptions{})
		if cerr != nil || !rep.OK() {
			t.Fatalf("round %d: store check: %v %v", round, cerr, rep)
		}
		res, _ := st.Verify(context.Background())
		for _, r := range res {
			if !r.OK {
				t.Fatalf("round %d: layer %s changed: %v", round, r.ID, r.Problems)
			}
		}
		d, _ := st.Desktop("vic")
		chain, _ := st.Chain(d.HeadVersion().System)
		st.Close()
		if !testutil.QemuCompare(t, filepath.Join(store, d.SystemDisk), view) {
			t.Fatalf("round %d: vic's view changed (chain of %d layers)", round, len(chain))
		}
		t.Logf("round %d: killed %v after %v; chain %d layers", round, killed, delay, len(chain))
		if !killed {
			if err != nil {
				t.Fatalf("squash: %v", err)
			}
			if len(chain) != 4 { // base, office:1, merge, vic:3 re-made
				t.Fatalf("squashed chain has %d layers, want 4", len(chain))
			}
			return
		}
		if round > 40 {
			t.Fatal("squash never finished")
		}
	}
}
