package hypervisor

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/cvd-project/cvd/internal/testutil"
)

// The libvirtd and the tiny guest the tests use, set up once by TestMain.
var (
	// testURI connects to a libvirtd: CVD_TEST_LIBVIRT_URI, else the system one
	// when it answers, else a private one started for this run.
	testURI    string
	libvirtErr error // why there is no libvirtd
	// privateDir is the private libvirtd's directory (scripts/libvirtd.sh), if
	// TestMain started one.
	privateDir string

	guestDir string // .cache/guest with kernel, initramfs.cpio.gz, cmdline
	guestErr error
)

func repoRoot() string {
	wd, _ := os.Getwd()
	return filepath.Dir(wd) // the tests run in hypervisor/
}

func TestMain(m *testing.M) {
	flag.Parse()
	code := func() int {
		if !testing.Short() {
			setupLibvirt()
			if libvirtErr == nil {
				setupGuest()
			}
		} else {
			libvirtErr = fmt.Errorf("-short: no libvirtd")
			guestErr = libvirtErr
		}
		defer teardownLibvirt()
		return m.Run()
	}()
	os.Exit(code)
}

func setupLibvirt() {
	if u := os.Getenv("CVD_TEST_LIBVIRT_URI"); u != "" {
		testURI = u
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if c, err := Connect(ctx, DefaultURI); err == nil {
		c.Close()
		testURI = DefaultURI
		return
	}
	if _, err := exec.LookPath("libvirtd"); err != nil {
		libvirtErr = fmt.Errorf("libvirtd not installed: %v", err)
		return
	}
	if os.Geteuid() != 0 {
		libvirtErr = fmt.Errorf("no libvirtd reachable and not root: cannot start a private one")
		return
	}
	dir, err := os.MkdirTemp("", "cvd-hv-libvirtd-")
	if err != nil {
		libvirtErr = err
		return
	}
	sock, err := libvirtdScript("start", dir)
	if err != nil {
		libvirtErr = fmt.Errorf("start a private libvirtd: %v", err)
		os.RemoveAll(dir)
		return
	}
	privateDir = dir
	testURI = "qemu:///system?socket=" + sock
}

func teardownLibvirt() {
	if privateDir == "" {
		return
	}
	if out, err := libvirtdScript("stop", privateDir); err != nil {
		fmt.Fprintf(os.Stderr, "stop the private libvirtd in %s: %v\n%s", privateDir, err, out)
		return
	}
	os.RemoveAll(privateDir)
}

// libvirtdScript runs scripts/libvirtd.sh and returns its stdout, trimmed.
func libvirtdScript(cmd, dir string) (string, error) {
	c := exec.Command(filepath.Join(repoRoot(), "scripts", "libvirtd.sh"), cmd, dir)
	var stderr strings.Builder
	c.Stderr = &stderr
	out, err := c.Output()
	if err != nil {
		return "", fmt.Errorf("%v: %s", err, stderr.String())
	}
	return strings.TrimSpace(string(out)), nil
}

func setupGuest() {
	root := repoRoot()
	dir := os.Getenv("CVD_GUEST_DIR")
	if dir == "" {
		dir = filepath.Join(root, ".cache", "guest")
	}
	// Idempotent and quick when the guest is up to date.
	c := exec.Command(filepath.Join(root, "scripts", "build-guest.sh"))
	c.Env = append(os.Environ(), "CVD_GUEST_DIR="+dir)
	if out, err := c.CombinedOutput(); err != nil {
		guestErr = fmt.Errorf("scripts/build-guest.sh: %v\n%s", err, out)
		return
	}
	for _, f := range []string{"kernel", "initramfs.cpio.gz", "cmdline"} {
		if _, err := os.Stat(filepath.Join(dir, f)); err != nil {
			guestErr = err
			return
		}
	}
	guestDir = dir
}

// needLibvirt skips (or, when CVD_TEST_REQUIRE names libvirt, fails) a test
// that needs a libvirtd, and returns a connection closed at cleanup.
func needLibvirt(t *testing.T) *Conn {
	t.Helper()
	if testing.Short() {
		t.Skip("-short: no libvirtd")
	}
	testutil.NeedTool(t, "libvirt", "libvirtd", "virsh", "qemu-system-x86_64")
	if libvirtErr != nil {
		if testutil.Required("libvirt") {
			t.Fatalf("libvirtd required but unavailable: %v", libvirtErr)
		}
		t.Skipf("no libvirtd: %v", libvirtErr)
	}
	return connect(t, testURI)
}

// needGuest is needLibvirt plus the tiny guest and the tools the guest tests use.
func needGuest(t *testing.T) *Conn {
	t.Helper()
	c := needLibvirt(t)
	testutil.NeedQemu(t)
	testutil.NeedTool(t, "libvirt", "genisoimage")
	if guestErr != nil {
		if testutil.Required("libvirt") {
			t.Fatalf("tiny guest required but unavailable: %v", guestErr)
		}
		t.Skipf("no tiny guest: %v", guestErr)
	}
	return c
}

func connect(t *testing.T, uri string) *Conn {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	c, err := Connect(ctx, uri)
	if err != nil {
		t.Fatalf("connect %s: %v", uri, err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// testDriverURI is test:///default on the same libvirtd as testURI.
func testDriverURI() string {
	t, err := ParseURI(testURI)
	if err != nil {
		return "test:///default"
	}
	return "test:///default?socket=" + t.Socket
}
