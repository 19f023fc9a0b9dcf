package main

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/cvd-project/cvd/internal/testutil"
)

// TestDiskOnStoreFiles: cvd disk never writes a sealed layer of a store or a
// read-only file, also as root, and works on a store's own tops without
// --allow-root; desktop show --json names those tops by absolute path.
func TestDiskOnStoreFiles(t *testing.T) {
	testutil.NeedQemu(t)
	dir := t.TempDir()
	store := filepath.Join(dir, "store")
	storeImages(t, store)
	base := filepath.Join(dir, "base.qcow2")
	testutil.Run(t, "qemu-img", "create", "-q", "-f", "qcow2", base, "64M")
	testutil.Run(t, "qemu-io", "-c", "write -P 0x11 0 1M", base)
	id := strings.TrimSpace(mustCvd(t, store, "layer", "import", base, "--kind", "base", "--name", "os:1"))
	mustCvd(t, store, "desktop", "create", "desk", "--base", "os:1")
	var d struct {
		SystemPath string `json:"system_path"`
	}
	if err := json.Unmarshal([]byte(mustCvd(t, store, "--json", "desktop", "show", "desk")), &d); err != nil {
		t.Fatal(err)
	}
	if !filepath.IsAbs(d.SystemPath) {
		t.Fatalf("desktop show --json: system_path %q is not absolute", d.SystemPath)
	}
	layer := filepath.Join(store, "layers", id+".qcow2")
	before := sumFile(t, layer)
	data := filepath.Join(dir, "data.bin")
	os.WriteFile(data, make([]byte, 65536), 0o644)
	top := filepath.Join(dir, "top.qcow2")
	testutil.Run(t, "qemu-img", "create", "-q", "-f", "qcow2", "-b", layer, "-F", "qcow2", top)
	for _, args := range [][]string{
		{"disk", "write", layer, "0", data},
		{"disk", "zero", layer, "0", "64K"},
		{"disk", "discard", layer, "0", "64K"},
		{"disk", "rebase", "--unsafe", "--none", layer},
		{"disk", "commit", layer},
	} {
		_, err := cvdIn(t, store, args...)
		if err == nil || !strings.Contains(err.Error(), "sealed layer") {
			t.Errorf("cvd %s: %v, want a refusal naming the sealed layer", strings.Join(args, " "), err)
		}
	}
	if sumFile(t, layer) != before {
		t.Fatal("the sealed layer changed")
	}
	// Any read-only file, outside a store too.
	ro := filepath.Join(dir, "ro.qcow2")
	testutil.Run(t, "qemu-img", "create", "-q", "-f", "qcow2", ro, "64M")
	os.Chmod(ro, 0o444)
	if _, err := cvdIn(t, store, "disk", "write", ro, "0", data); err == nil || !strings.Contains(err.Error(), "read-only") {
		t.Errorf("disk write of a 0444 file: %v", err)
	}
	// The desktop's top: no --allow-root needed for its ../layers backing.
	mustCvd(t, store, "disk", "write", d.SystemPath, "1M", data)
	mustCvd(t, store, "disk", "zero", d.SystemPath, "0", "64K")
	mustCvd(t, store, "disk", "map", d.SystemPath)
	mustCvd(t, store, "store", "check")
}
