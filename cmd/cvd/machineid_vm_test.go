package main

import (
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"

	"github.com/cvd-project/cvd/internal/testutil"
)

// TestClonesBootWithTheirOwnMachineID: a desktop boots once (the tiny guest
// mounts its ext4 system disk and, as systemd does at a first boot, writes its
// VM's UUID into the empty /etc/machine-id); its disk is sealed as a layer;
// ten clones of a desktop on that layer boot under libvirt and each reads a
// machine-id of its own (its UUID's, written by cvd into its top), none the
// golden one's, and its own hostname in /etc/hostname.
func TestClonesBootWithTheirOwnMachineID(t *testing.T) {
	env := setupVMEnv(t)
	testutil.NeedTool(t, "e2fsprogs", "mkfs.ext4")
	dir := t.TempDir()
	s := &vmStore{t: t, env: env, dir: filepath.Join(dir, "store")}
	storeImages(t, s.dir)
	tree := filepath.Join(dir, "tree")
	os.MkdirAll(filepath.Join(tree, "etc"), 0o755)
	os.WriteFile(filepath.Join(tree, "etc", "machine-id"), nil, 0o444) // never booted
	os.WriteFile(filepath.Join(tree, "etc", "hostname"), []byte("golden\n"), 0o644)
	raw := testutil.MakeExt4(t, filepath.Join(dir, "os.raw"), tree, 64<<20)
	q := filepath.Join(dir, "os.qcow2")
	testutil.Run(t, "qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, q)
	s.must("layer", "import", q, "--kind", "base", "--name", "os:1")
	s.must("desktop", "create", "golden", "--base", "os:1")

	provision := func(desk, name string, count int, extra string) provisionReport {
		t.Helper()
		var rep provisionReport
		s.mustJSON(&rep, "provision", desk, "--count", strconv.Itoa(count), "--name", name, "--connect", env.uri,
			"--memory", "128", "--kernel", env.kernel, "--initrd", env.initrd, "--append", env.cmdline+" cvd.fs=1 "+extra)
		t.Cleanup(func() {
			for _, c := range rep.Clones {
				s.cvd("vm", "rm", "--force", "--connect", env.uri, c.Name)
			}
		})
		if len(rep.Clones) != count || rep.Failed != 0 {
			t.Fatalf("provision %s: %+v", name, rep)
		}
		// One wait each (each command has its own few minutes): ten guests
		// under TCG on a busy 2-core machine take a while.
		for _, c := range rep.Clones {
			s.must("vm", "wait", "--connect", env.uri, "--timeout", "170s", c.Name)
		}
		return rep
	}
	g := provision("golden", "g", 1, "cvd.fs_machineid=1").Clones[0].Name
	log := s.serialLog(g)
	m := regexp.MustCompile(`cvd-guest: machine-id set ([0-9a-f]{32})`).FindStringSubmatch(log)
	if m == nil || !strings.Contains(log, "cvd-guest: fs unmounted") {
		t.Fatalf("the golden boot:\n%s", log)
	}
	golden := m[1]
	s.must("layer", "seal", g, "--kind", "app", "--name", "os:booted")
	s.must("desktop", "create", "booted", "--app", "os:booted")

	rep := provision("booted", "pc", 10, "cvd.fs_cat=/etc/machine-id,/etc/hostname")
	seen := map[string]string{}
	re := regexp.MustCompile(`cvd-guest: cat /etc/machine-id ([0-9a-f]*)`)
	for _, c := range rep.Clones {
		log := s.serialLog(c.Name)
		m := re.FindStringSubmatch(log)
		if m == nil || !strings.Contains(log, "cvd-guest: fs unmounted") {
			t.Fatalf("%s:\n%s", c.Name, log)
		}
		id := m[1]
		rec := s.clone(c.Name)
		if !strings.Contains(log, "cvd-guest: cat /etc/hostname "+rec.Hostname+"\n") && !strings.Contains(log, "cvd-guest: cat /etc/hostname "+rec.Hostname+"\r") {
			t.Errorf("%s does not read its hostname %s in /etc/hostname:\n%s", c.Name, rec.Hostname, log)
		}
		if id == golden || id != strings.ReplaceAll(rec.UUID, "-", "") || seen[id] != "" {
			t.Errorf("%s reads machine-id %q (uuid %s, golden %s, also %s's)", c.Name, id, rec.UUID, golden, seen[id])
		}
		seen[id] = c.Name
	}
	t.Logf("golden machine-id %s; %d clones booted with %d distinct machine-ids", golden, len(rep.Clones), len(seen))
}
