package main

import (
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"io"
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

// buildCvd builds the cvd binary for tests that run it as a separate process.
func buildCvd(t *testing.T) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "cvd")
	cmd := exec.Command("go", "build", "-o", bin, ".")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	return bin
}

func sumFile(t *testing.T, p string) string {
	t.Helper()
	f, err := os.Open(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	h := sha256.New()
	io.Copy(h, f)
	return fmt.Sprintf("%x", h.Sum(nil))
}

// TestCrashSafety runs import, seal and clone as separate processes and SIGKILLs
// them at random moments. After each kill, `cvd store check` must report the
// store clean (after recovery), the layers, desktop and clones that existed before
// must be untouched, and a layer or clone is either wholly there or not at all.
func TestCrashSafety(t *testing.T) {
	testutil.NeedQemu(t)
	bin := buildCvd(t)
	dir := t.TempDir()
	store := filepath.Join(dir, "store")
	rounds := 8
	if testing.Short() {
		rounds = 3
	}
	run := func(args ...string) (string, error) {
		cmd := exec.Command(bin, append([]string{"--store", store}, args...)...)
		out, err := cmd.CombinedOutput()
		return string(out), err
	}
	must := func(args ...string) string {
		t.Helper()
		out, err := run(args...)
		if err != nil {
			t.Fatalf("cvd %s: %v\n%s", strings.Join(args, " "), err, out)
		}
		return out
	}

	// What exists before any crash.
	base := filepath.Join(dir, "base.qcow2")
	testutil.Run(t, "qemu-img", "create", "-q", "-f", "qcow2", base, "256M")
	testutil.Run(t, "qemu-io", "-c", "write -P 0x5a 0 16M", base)
	baseID := strings.TrimSpace(must("layer", "import", base, "--kind", "base", "--name", "os:1"))
	must("desktop", "create", "desk", "--base", "os:1")
	must("clone", "desk", "--name", "keep", "--count", "5")
	protected := map[string]string{}
	filepath.Walk(store, func(p string, fi os.FileInfo, err error) error {
		if err == nil && fi.Mode().IsRegular() && !strings.Contains(filepath.Base(p), images.CatalogFile) {
			protected[p] = sumFile(t, p)
		}
		return nil
	})

	// Sources: distinct content for every import and seal.
	src := func(kind string, i int) string {
		p := filepath.Join(dir, fmt.Sprintf("%s-%d.qcow2", kind, i))
		if kind == "import" {
			testutil.Run(t, "qemu-img", "create", "-q", "-f", "qcow2", p, "256M")
			testutil.Run(t, "qemu-io", "-c", fmt.Sprintf("write -P %d 0 48M", i+1), p)
		} else {
			testutil.Run(t, "qemu-img", "create", "-q", "-f", "qcow2", "-b", filepath.Join(store, "layers", baseID+".qcow2"), "-F", "qcow2", p)
			testutil.Run(t, "qemu-io", "-c", fmt.Sprintf("write -P %d 1M 24M", i+1), p)
		}
		return p
	}
	ops := []struct {
		name string
		args func(i int) []string
	}{
		{"import", func(i int) []string {
			return []string{"layer", "import", src("import", i), "--kind", "base", "--name", fmt.Sprintf("imp:%d", i)}
		}},
		{"seal", func(i int) []string {
			return []string{"layer", "seal", src("seal", i), "--name", fmt.Sprintf("seal:%d", i)}
		}},
		{"clone", func(i int) []string {
			return []string{"clone", "desk", "--name", fmt.Sprintf("c%d", i), "--count", "300"}
		}},
	}

	killed, recovered := 0, 0
	for _, op := range ops {
		// One full run tells how long the operation takes.
		args := op.args(0)
		start := time.Now()
		must(args...)
		full := time.Since(start)
		t.Logf("%s: a full run takes %v", op.name, full.Round(time.Millisecond))
		for i := 1; i <= rounds; i++ {
			args := op.args(i)
			delay := time.Duration(rand.Int64N(int64(full) * 13 / 10))
			cmd := exec.Command(bin, append([]string{"--store", store}, args...)...)
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			done := make(chan error, 1)
			go func() { done <- cmd.Wait() }()
			select {
			case <-done:
			case <-time.After(delay):
				cmd.Process.Signal(syscall.SIGKILL)
				if err := <-done; err != nil {
					killed++
				}
			}
			out, err := run("store", "check")
			if err != nil {
				t.Fatalf("%s round %d (killed after %v): store check: %v\n%s", op.name, i, delay, err, out)
			}
			if strings.Contains(out, "recovered:") {
				recovered++
			}
			// All or nothing.
			switch op.name {
			case "import", "seal":
				var ls []images.Layer
				json.Unmarshal([]byte(must("--json", "layer", "ls")), &ls)
				for _, l := range ls {
					for _, n := range l.Names {
						if n == fmt.Sprintf("%s:%d", map[string]string{"import": "imp", "seal": "seal"}[op.name], i) {
							if out, err := run("layer", "verify", l.ID); err != nil {
								t.Errorf("%s round %d: the new layer does not verify: %v\n%s", op.name, i, err, out)
							}
						}
					}
				}
			case "clone":
				var cs []images.Clone
				json.Unmarshal([]byte(must("--json", "clone", "ls", fmt.Sprintf("c%d-*", i))), &cs)
				if len(cs) != 0 && len(cs) != 300 {
					t.Errorf("clone round %d: %d of 300 clones are visible", i, len(cs))
				}
			}
			for p, sum := range protected {
				if got := sumFile(t, p); got != sum {
					t.Fatalf("%s round %d: %s changed", op.name, i, p)
				}
			}
		}
	}
	t.Logf("%d operations killed midway, %d recoveries", killed, recovered)
	if killed == 0 {
		t.Error("no operation was killed midway")
	}
	if out, err := run("store", "check", "--deep"); err != nil {
		t.Errorf("deep check: %v\n%s", err, out)
	}
	if out, err := run("layer", "verify"); err != nil {
		t.Errorf("verify: %v\n%s", err, out)
	}
	var cs []images.Clone
	json.Unmarshal([]byte(must("--json", "clone", "ls", "keep-*")), &cs)
	if len(cs) != 5 {
		t.Errorf("%d of the 5 first clones left", len(cs))
	}
	n := 0
	filepath.Walk(store, func(p string, fi os.FileInfo, err error) error {
		if err == nil && strings.HasSuffix(p, ".qcow2") && n < 200 {
			n++
			testutil.QemuCheck(t, p)
		}
		return nil
	})
}
