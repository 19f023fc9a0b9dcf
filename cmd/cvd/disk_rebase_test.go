package main

import (
	"encoding/json"
	"path/filepath"
	"strings"
	"testing"

	"github.com/cvd-project/cvd/internal/testutil"
)

// rebaseFixture: base ← old (app v1), base ← new (app v2), old ← top (user data).
func rebaseFixture(t *testing.T) (dir, base, old, newer, top string) {
	t.Helper()
	testutil.NeedQemu(t)
	dir = t.TempDir()
	base, old, newer, top = filepath.Join(dir, "base.qcow2"), filepath.Join(dir, "old.qcow2"),
		filepath.Join(dir, "new.qcow2"), filepath.Join(dir, "top.qcow2")
	for _, p := range []string{base, old, newer, top} {
		testutil.CheckOnCleanup(t, p)
	}
	testutil.Run(t, "qemu-img", "create", "-q", "-f", "qcow2", base, "64M")
	testutil.Run(t, "qemu-io", "-c", "write -P 1 0 8M", base)
	testutil.Run(t, "qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", old)
	testutil.Run(t, "qemu-io", "-c", "write -P 2 4M 2M", old)
	testutil.Run(t, "qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", newer)
	testutil.Run(t, "qemu-io", "-c", "write -P 3 4M 1M", "-c", "write -P 2 5M 1M", "-c", "write -P 4 32M 1M", newer)
	testutil.Run(t, "qemu-img", "create", "-q", "-f", "qcow2", "-b", "old.qcow2", "-F", "qcow2", top)
	testutil.Run(t, "qemu-io", "-c", "write -P 5 4M 512K", top)
	return
}

func TestDiskRebaseCLI(t *testing.T) {
	dir, _, _, newer, top := rebaseFixture(t)
	flat := filepath.Join(dir, "flat.qcow2")
	testutil.Run(t, "qemu-img", "convert", "-O", "qcow2", top, flat)

	out := diskMust(t, "--json", "disk", "rebase", top, "--onto", newer)
	var rep struct {
		Compared int64  `json:"clusters-compared"`
		Copied   int64  `json:"clusters-copied"`
		Zeroed   int64  `json:"clusters-zeroed"`
		Name     string `json:"backing-name"`
	}
	if err := json.Unmarshal([]byte(out), &rep); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	// old holds 4M..6M, new 4M..6M and 32M..33M; top holds 4M..4.5M. Differing and
	// not in top: 4.5M..5M (copied as data), 32M..33M (zero clusters); 5M..6M is the
	// same in both.
	if rep.Compared != 40 || rep.Copied != 8 || rep.Zeroed != 16 || rep.Name != "new.qcow2" {
		t.Fatalf("report %+v\n%s", rep, out)
	}
	if !testutil.QemuCompare(t, top, flat) {
		t.Fatal("the guest view changed")
	}
	info := testutil.Run(t, "qemu-img", "info", top)
	if !strings.Contains(info, "backing file: new.qcow2") || !strings.Contains(info, "backing file format: qcow2") {
		t.Fatalf("qemu-img info:\n%s", info)
	}
	human := diskMust(t, "disk", "rebase", top, "--onto", newer)
	if !strings.Contains(human, "clusters compared:     0") {
		t.Fatalf("second rebase:\n%s", human)
	}
}

func TestDiskRebaseUnsafeAndUsage(t *testing.T) {
	_, _, _, newer, top := rebaseFixture(t)
	if _, _, err := diskExec(t, "disk", "rebase", top); exitCode(err) != exitUsage {
		t.Fatalf("rebase without --onto: %v", err)
	}
	if _, _, err := diskExec(t, "disk", "rebase", top, "--onto", newer, "--none"); exitCode(err) != exitUsage {
		t.Fatalf("rebase with --onto and --none: %v", err)
	}
	diskMust(t, "disk", "rebase", "--unsafe", top, "--onto", newer)
	testutil.Run(t, "qemu-io", "-c", "read -P 4 32M 1M", "-c", "read -P 5 4M 512K", "-c", "read -P 3 4608K 512K", top)
}

func TestDiskDiffCLI(t *testing.T) {
	_, base, old, newer, _ := rebaseFixture(t)
	out, _, err := diskExec(t, "--json", "disk", "diff", old, newer)
	if exitCode(err) != exitFailure {
		t.Fatalf("diff of different chains: exit %d (%v)", exitCode(err), err)
	}
	var rep struct {
		Ranges []struct {
			Off int64 `json:"offset"`
			Len int64 `json:"length"`
		} `json:"ranges"`
		Shared int `json:"shared-layers"`
	}
	if err := json.Unmarshal([]byte(out), &rep); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	if len(rep.Ranges) != 2 || rep.Ranges[0].Off != 4<<20 || rep.Ranges[0].Len != 1<<20 ||
		rep.Ranges[1].Off != 32<<20 || rep.Ranges[1].Len != 1<<20 || rep.Shared != 1 {
		t.Fatalf("diff: %s", out)
	}
	if out, _, err := diskExec(t, "disk", "diff", base, base); err != nil || !strings.HasPrefix(out, "0 clusters") {
		t.Fatalf("diff of an image with itself: %v\n%s", err, out)
	}
}
