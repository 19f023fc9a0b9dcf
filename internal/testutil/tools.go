package testutil

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"testing"
)

// Required reports whether the environment demands the named tool group. CI sets
// CVD_TEST_REQUIRE=all (make test does); a comma list such as "qemu,libvirt"
// names groups.
func Required(group string) bool {
	v := os.Getenv("CVD_TEST_REQUIRE")
	if v == "all" {
		return true
	}
	for _, g := range strings.Split(v, ",") {
		if strings.TrimSpace(g) == group {
			return true
		}
	}
	return false
}

// NeedTool skips the test when a program is missing, or fails it when the group
// it belongs to is required.
func NeedTool(t testing.TB, group string, programs ...string) {
	t.Helper()
	for _, p := range programs {
		if _, err := exec.LookPath(p); err != nil {
			if Required(group) {
				t.Fatalf("%s is required (CVD_TEST_REQUIRE=%s) but not found: %v", p, os.Getenv("CVD_TEST_REQUIRE"), err)
			}
			t.Skipf("%s not found; set CVD_TEST_REQUIRE=%s to make this a failure", p, group)
		}
	}
}

// NeedQemu is NeedTool for qemu-img and qemu-io.
func NeedQemu(t testing.TB) { t.Helper(); NeedTool(t, "qemu", "qemu-img", "qemu-io") }

// Run runs a command and returns its stdout, failing the test on error.
func Run(t testing.TB, name string, args ...string) string {
	t.Helper()
	out, err := RunErr(name, args...)
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return out
}

// RunErr runs a command and returns its combined output.
func RunErr(name string, args ...string) (string, error) {
	cmd := exec.Command(name, args...)
	var b bytes.Buffer
	cmd.Stdout, cmd.Stderr = &b, &b
	err := cmd.Run()
	return b.String(), err
}

// QemuCheck runs `qemu-img check` on one layer and fails the test on errors or
// leaks (exit codes 2 and 3).
func QemuCheck(t testing.TB, path string) {
	t.Helper()
	qemuCheck(t, path, path)
}

// QemuCheckLUKS is QemuCheck of an encrypted qcow2 chain: keys[k] opens layer k
// (0 the top), "" for a plain layer.
func QemuCheckLUKS(t testing.TB, path string, keys ...string) {
	t.Helper()
	objs, spec := LUKSImageOpts(path, keys...)
	qemuCheck(t, path, append(objs, "--image-opts", spec)...)
}

// LUKSImageOpts returns the --object arguments and the --image-opts spec with
// which QEMU opens the qcow2 chain at path whose layer k (0 the top) is
// encrypted with keys[k] ("" for a plain layer).
func LUKSImageOpts(path string, keys ...string) (objects []string, spec string) {
	spec = "driver=qcow2,file.filename=" + strings.ReplaceAll(path, ",", ",,")
	prefix := ""
	for k, key := range keys {
		if key != "" {
			id := fmt.Sprintf("sec%d", k)
			objects = append(objects, "--object", "secret,id="+id+",data="+key)
			spec += "," + prefix + "encrypt.key-secret=" + id
		}
		prefix += "backing."
	}
	return objects, spec
}

func qemuCheck(t testing.TB, path string, args ...string) {
	t.Helper()
	out, err := RunErr("qemu-img", append([]string{"check", "--output=json"}, args...)...)
	if err != nil {
		var ee *exec.ExitError
		code := -1
		if errors.As(err, &ee) {
			code = ee.ExitCode()
		}
		t.Fatalf("qemu-img check %s: exit %d\n%s", path, code, out)
	}
	var r struct {
		Corruptions int `json:"corruptions"`
		Leaks       int `json:"leaks"`
		CheckErrors int `json:"check-errors"`
	}
	if err := json.Unmarshal([]byte(out), &r); err != nil {
		t.Fatalf("qemu-img check %s: bad json: %v\n%s", path, err, out)
	}
	if r.Corruptions+r.Leaks+r.CheckErrors != 0 {
		t.Fatalf("qemu-img check %s: %+v", path, r)
	}
}

// CheckOnCleanup registers QemuCheck of path to run when the test ends (after the
// test has closed its images), like bbolt's MustCheck.
func CheckOnCleanup(t testing.TB, path string) {
	t.Helper()
	t.Cleanup(func() {
		if _, err := os.Stat(path); err == nil {
			QemuCheck(t, path)
		}
	})
}

// QemuCompare runs `qemu-img compare A B` (guest views of the whole chains) and
// reports whether they are identical. Exit 2 fails the test.
func QemuCompare(t testing.TB, a, b string, extra ...string) bool {
	t.Helper()
	args := append([]string{"compare"}, extra...)
	args = append(args, a, b)
	out, err := RunErr("qemu-img", args...)
	if err == nil {
		return true
	}
	var ee *exec.ExitError
	if errors.As(err, &ee) && ee.ExitCode() == 1 {
		return false
	}
	t.Fatalf("qemu-img compare %s %s: %v\n%s", a, b, err, out)
	return false
}

// MakeExt4 makes a raw disk image of size bytes at path holding an ext4 file
// system filled from the directory src (mkfs.ext4 -d), with extra mkfs.ext4
// arguments, and returns path.
func MakeExt4(t testing.TB, path, src string, size int64, extra ...string) string {
	t.Helper()
	NeedTool(t, "e2fsprogs", "mkfs.ext4")
	os.Remove(path)
	if err := os.WriteFile(path, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(path, size); err != nil {
		t.Fatal(err)
	}
	Run(t, "mkfs.ext4", append(append([]string{"-q", "-F", "-d", src}, extra...), path)...)
	return path
}

// NeedFileWriter fails (when CI requires loop mounts) or skips unless
// files.Apply can run here: root, e2fsprogs, losetup and mount, and
// qemu-storage-daemon.
func NeedFileWriter(t testing.TB) {
	t.Helper()
	NeedQemu(t)
	NeedTool(t, "e2fsprogs", "mkfs.ext4", "e2fsck")
	NeedTool(t, "loop", "mount", "umount", "losetup")
	NeedTool(t, "qemu", "qemu-storage-daemon")
	if os.Geteuid() != 0 {
		if Required("loop") {
			t.Fatal("loop required (CVD_TEST_REQUIRE) but not root")
		}
		t.Skip("the file writer loop-mounts: needs root")
	}
}
