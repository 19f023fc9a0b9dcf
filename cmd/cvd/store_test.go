package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/cvd-project/cvd/images"
	"github.com/cvd-project/cvd/internal/testutil"
)

// cvdIn runs the cvd command line in-process against store and returns stdout.
func cvdIn(t *testing.T, store string, args ...string) (string, error) {
	t.Helper()
	root := newRootCommand()
	var out, errb bytes.Buffer
	root.SetOut(&out)
	root.SetErr(&errb)
	root.SetArgs(append([]string{"--store", store}, args...))
	err := root.Execute()
	return out.String(), err
}

func mustCvd(t *testing.T, store string, args ...string) string {
	t.Helper()
	out, err := cvdIn(t, store, args...)
	if err != nil {
		t.Fatalf("cvd %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return out
}

// storeImages registers qemu-img check of every qcow2 file in the store for the
// end of the test.
func storeImages(t *testing.T, store string) {
	t.Cleanup(func() {
		filepath.Walk(store, func(p string, fi os.FileInfo, err error) error {
			if err == nil && strings.HasSuffix(p, ".qcow2") {
				testutil.QemuCheck(t, p)
			}
			return nil
		})
	})
}

func TestStoreCommands(t *testing.T) {
	testutil.NeedQemu(t)
	testutil.NeedTool(t, "iso", "isoinfo")
	dir := t.TempDir()
	store := filepath.Join(dir, "store")
	storeImages(t, store)
	base := filepath.Join(dir, "base.qcow2")
	testutil.Run(t, "qemu-img", "create", "-q", "-f", "qcow2", base, "256M")
	testutil.Run(t, "qemu-io", "-c", "write -P 0x5a 0 16M", base)
	app := filepath.Join(dir, "app.qcow2")
	testutil.Run(t, "qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", app)
	testutil.Run(t, "qemu-io", "-c", "write -P 0x11 32M 4M", app)

	baseID := strings.TrimSpace(mustCvd(t, store, "layer", "import", base, "--kind", "base", "--name", "win11:2026-11"))
	if len(baseID) != 64 {
		t.Fatalf("import printed %q", baseID)
	}
	appID := strings.TrimSpace(mustCvd(t, store, "layer", "import", app, "--kind", "app", "--parent", "win11:2026-11", "--name", "office:2026"))
	if again := strings.TrimSpace(mustCvd(t, store, "layer", "import", base, "--kind", "base")); again != baseID {
		t.Errorf("re-import: %s, want %s", again, baseID)
	}
	mustCvd(t, store, "desktop", "create", "alice", "--base", "win11:2026-11", "--app", "office", "--user-size", "1G")

	var cs []images.Clone
	if err := json.Unmarshal([]byte(mustCvd(t, store, "--json", "clone", "alice", "--name", "vm", "--count", "20")), &cs); err != nil || len(cs) != 20 {
		t.Fatalf("clone --json: %v, %d clones", err, len(cs))
	}
	mustCvd(t, store, "clone", "create", "win11:2026-11", "--name", "bare", "--no-seed")

	tests := []struct {
		name    string
		args    []string
		code    int      // exit code
		want    []string // in stdout (or the error)
		notWant []string
	}{
		{"layer ls", []string{"layer", "ls"}, 0, []string{baseID[:12], appID[:12], "win11:2026-11", "office:2026", "base", "app"}, nil},
		{"layer show", []string{"layer", "show", "office"}, 0, []string{appID, "chain:", baseID[:12], "desktop alice", "clone vm-01"}, nil},
		{"layer show by prefix", []string{"layer", "show", baseID[:8]}, 0, []string{baseID, "layer " + appID[:12]}, nil},
		{"layer rm refused", []string{"layer", "rm", "win11:2026-11"}, 1, []string{"has dependents", "layer " + appID[:12], "desktop alice", "clone bare"}, nil},
		{"layer verify", []string{"layer", "verify"}, 0, []string{"ok       " + baseID[:12], "ok       " + appID[:12]}, []string{"ALTERED"}},
		{"desktop ls", []string{"desktop", "ls"}, 0, []string{"alice", appID[:12], "blank 1 GiB"}, nil},
		{"desktop show", []string{"desktop", "show", "alice"}, 0, []string{"system disk", "user disk", "* 1"}, nil},
		{"desktop rm refused", []string{"desktop", "rm", "alice"}, 1, []string{"clone vm-01"}, nil},
		{"clone ls pattern", []string{"clone", "ls", "vm-0*"}, 0, []string{"vm-01", "vm-09", "alice@1"}, []string{"vm-10", "bare"}},
		{"clone show", []string{"clone", "show", "vm-05"}, 0, []string{"02:", "seed", "user disk", "chain:"}, nil},
		{"gc dry run keeps all", []string{"gc", "--dry-run"}, 0, []string{"would remove 0 layers", "kept 2"}, nil},
		{"store check", []string{"store", "check"}, 0, []string{"is clean: 2 layers, 1 desktops, 21 clones"}, nil},
		{"store info", []string{"store", "info"}, 0, []string{"clones    21"}, nil},
		{"bad kind", []string{"layer", "import", base, "--kind", "nope"}, 2, []string{"kind"}, nil},
		{"bad size", []string{"desktop", "create", "x", "--base", "win11", "--user-size", "lots"}, 2, []string{"invalid size"}, nil},
		{"unknown layer", []string{"layer", "show", "nope:1"}, 1, []string{"not found"}, nil},
		{"clone without name", []string{"clone", "alice"}, 2, []string{"--name"}, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			out, err := cvdIn(t, store, tt.args...)
			if code := exitCode(err); code != tt.code {
				t.Errorf("exit %d, want %d (%v)\n%s", code, tt.code, err, out)
			}
			if err != nil {
				out += err.Error()
			}
			for _, w := range tt.want {
				if !strings.Contains(out, w) {
					t.Errorf("output lacks %q:\n%s", w, out)
				}
			}
			for _, w := range tt.notWant {
				if strings.Contains(out, w) {
					t.Errorf("output has %q:\n%s", w, out)
				}
			}
		})
	}

	// An altered layer is caught by verify and check.
	lp := filepath.Join(store, "layers", appID+".qcow2")
	os.Chmod(lp, 0o644)
	testutil.Run(t, "qemu-io", "-c", "write -P 0x99 32M 4k", lp)
	out, err := cvdIn(t, store, "layer", "verify")
	if exitCode(err) != 2 || !strings.Contains(out, "ALTERED  "+appID[:12]) || !strings.Contains(out, "ok       "+baseID[:12]) {
		t.Errorf("verify of an altered layer: %v\n%s", err, out)
	}
	out, err = cvdIn(t, store, "store", "check")
	if exitCode(err) != 2 || !strings.Contains(out, "altered") || !strings.Contains(out, "writable") {
		t.Errorf("check of an altered layer: %v\n%s", err, out)
	}
	var ee *exitError
	if !errors.As(err, &ee) {
		t.Errorf("check error %T", err)
	}

	// Remove everything: clones, desktop, untag, gc.
	mustCvd(t, store, "clone", "rm", "vm-*", "bare")
	mustCvd(t, store, "desktop", "rm", "alice")
	mustCvd(t, store, "layer", "untag", "office:2026")
	out = mustCvd(t, store, "gc", "--dry-run")
	if !strings.Contains(out, "would remove 1 layers") || !strings.Contains(out, appID[:12]) {
		t.Errorf("gc --dry-run:\n%s", out)
	}
	out = mustCvd(t, store, "gc")
	if !strings.Contains(out, "removed 1 layers") {
		t.Errorf("gc:\n%s", out)
	}
	mustCvd(t, store, "layer", "rm", "win11:2026-11")
	if out := mustCvd(t, store, "--json", "layer", "ls"); strings.TrimSpace(out) != "[]" {
		t.Errorf("layers left: %s", out)
	}
	if out := mustCvd(t, store, "store", "check", "--deep"); !strings.Contains(out, "is clean") {
		t.Errorf("final check: %s", out)
	}
}
