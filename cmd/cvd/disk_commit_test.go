package main

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/cvd-project/cvd/internal/testutil"
)

func TestDiskCommitCLI(t *testing.T) {
	dir, base, old, _, top := rebaseFixture(t)
	flat := filepath.Join(dir, "flat.qcow2")
	testutil.Run(t, "qemu-img", "convert", "-O", "qcow2", top, flat)

	// Into the writable backing file.
	out := diskMust(t, "--store", filepath.Join(dir, "store"), "--json", "disk", "commit", top)
	var rep struct {
		Sealed bool   `json:"sealed"`
		Target string `json:"target"`
		Copied int64  `json:"clusters-copied"`
	}
	if err := json.Unmarshal([]byte(out), &rep); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	if rep.Sealed || rep.Copied != 8 || filepath.Base(rep.Target) != "old.qcow2" {
		t.Fatalf("commit: %s", out)
	}
	if !testutil.QemuCompare(t, top, flat) || !testutil.QemuCompare(t, old, flat) {
		t.Fatal("guest view changed")
	}
	testutil.Run(t, "qemu-io", "-c", "read -P 5 4M 512K", old)

	// Into a sealed base: a new layer instead, the base untouched.
	testutil.Run(t, "qemu-io", "-c", "write -P 9 60M 64K", top)
	testutil.Run(t, "qemu-img", "convert", "-O", "qcow2", top, flat+"2")
	if err := os.Chmod(base, 0o444); err != nil {
		t.Fatal(err)
	}
	sum := testutil.Run(t, "sha256sum", base)
	nl := filepath.Join(dir, "merged.qcow2")
	testutil.CheckOnCleanup(t, nl)
	human := diskMust(t, "disk", "commit", top, "--into", base, "-o", nl)
	if !strings.Contains(human, "is sealed") {
		t.Fatalf("commit into a sealed layer:\n%s", human)
	}
	if testutil.Run(t, "sha256sum", base) != sum {
		t.Fatal("the sealed base was written")
	}
	if !testutil.QemuCompare(t, top, flat+"2") {
		t.Fatal("guest view changed")
	}
	info := testutil.Run(t, "qemu-img", "info", top)
	if !strings.Contains(info, "backing file: merged.qcow2") {
		t.Fatalf("top does not stand on the new layer:\n%s", info)
	}

	// A store layer is sealed even when writable.
	store := filepath.Join(dir, "store")
	if err := os.MkdirAll(filepath.Join(store, "layers"), 0o755); err != nil {
		t.Fatal(err)
	}
	sl := filepath.Join(store, "layers", "l.qcow2")
	st := filepath.Join(dir, "st.qcow2")
	testutil.Run(t, "qemu-img", "create", "-q", "-f", "qcow2", sl, "1M")
	testutil.Run(t, "qemu-img", "create", "-q", "-f", "qcow2", "-b", sl, "-F", "qcow2", st)
	testutil.Run(t, "qemu-io", "-c", "write -P 7 0 64K", st)
	out = diskMust(t, "--store", store, "--json", "--allow-root", dir, "disk", "commit", st)
	if !strings.Contains(out, `"sealed": true`) {
		t.Fatalf("store layer not treated as sealed: %s", out)
	}
	testutil.CheckOnCleanup(t, filepath.Join(dir, "st.commit.qcow2"))
	testutil.Run(t, "qemu-io", "-c", "read -P 0 0 64K", sl)
	testutil.Run(t, "qemu-io", "-c", "read -P 7 0 64K", st)
}

func TestDiskFlattenCLI(t *testing.T) {
	dir, _, _, _, top := rebaseFixture(t)
	for _, args := range [][]string{{}, {"--compress", "zstd"}, {"--format", "raw"}} {
		out := filepath.Join(dir, "flat"+strings.Join(args, ""))
		diskMust(t, append([]string{"disk", "flatten", top, "-o", out}, args...)...)
		if !testutil.QemuCompare(t, top, out) {
			t.Fatalf("flatten %v differs", args)
		}
		if len(args) == 0 || args[0] != "--format" {
			testutil.QemuCheck(t, out)
		}
	}
	if _, _, err := diskExec(t, "disk", "flatten", top); exitCode(err) != exitUsage {
		t.Fatalf("flatten without -o: %v", err)
	}
	if _, _, err := diskExec(t, "disk", "flatten", top, "-o", filepath.Join(dir, "x"), "--format", "raw", "--compress", "zstd"); exitCode(err) != exitUsage {
		t.Fatalf("flatten raw compressed: %v", err)
	}
}
