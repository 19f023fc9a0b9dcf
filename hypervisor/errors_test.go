package hypervisor

import (
	"context"
	"errors"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/cvd-project/cvd/internal/testutil"
)

// Every operation on a domain that does not exist says ErrNotFound and names it.
func TestErrorMissingDomain(t *testing.T) {
	c := needLibvirt(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	name := uniqueName("missing")
	ops := map[string]func() error{
		"start":      func() error { return c.Start(ctx, name) },
		"status":     func() error { _, err := c.Status(ctx, name); return err },
		"wait":       func() error { _, err := c.Wait(ctx, name); return err },
		"shutdown":   func() error { _, err := c.Shutdown(ctx, name, time.Second); return err },
		"destroy":    func() error { return c.Destroy(ctx, name) },
		"undefine":   func() error { return c.Undefine(ctx, name, UndefineSnapshots) },
		"dumpxml":    func() error { _, err := c.DumpXML(ctx, name); return err },
		"info":       func() error { _, err := c.Info(ctx, name); return err },
		"checkpoint": func() error { _, err := c.Checkpoint(ctx, name, "/tmp/never.qcow2"); return err },
	}
	for op, f := range ops {
		err := f()
		if !errors.Is(err, ErrNotFound) || !strings.Contains(err.Error(), `"`+name+`"`) || !strings.HasPrefix(err.Error(), op) {
			t.Errorf("%s: got %v, want ErrNotFound naming the operation and %q", op, err, name)
		}
	}
	// A name that cannot be a domain is refused before libvirt sees it.
	if err := c.Start(ctx, "../etc"); !errors.Is(err, ErrInvalidSpec) {
		t.Errorf("start ../etc: got %v, want ErrInvalidSpec", err)
	}
}

func TestErrorBadURI(t *testing.T) {
	c := needLibvirt(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for _, uri := range []string{"xen:///system", "qemu+ssh://host/system", "qemu:///session", "qemu:///system?socket=rel"} {
		if _, err := Connect(ctx, uri); !errors.Is(err, ErrBadURI) || !strings.Contains(err.Error(), uri) {
			t.Errorf("connect %s: got %v, want ErrBadURI naming the URI", uri, err)
		}
	}
	// A URI that parses but that libvirtd refuses: the test driver with a
	// configuration file that does not exist.
	sock := c.Target().Socket
	uri := "test:///nonexistent/cvd-test.xml?socket=" + sock
	_, err := Connect(ctx, uri)
	if !errors.Is(err, ErrBadURI) {
		t.Errorf("connect %s: got %v, want ErrBadURI", uri, err)
	}
	t.Logf("libvirtd refusing a URI: %v", err)
}

// A libvirtd that is not there: no socket, a stale socket, and one that stops
// while connected (and one that hangs).
func TestErrorLibvirtdDown(t *testing.T) {
	needLibvirt(t)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()

	missing := "qemu:///system?socket=/nonexistent/libvirt-sock"
	_, err := Connect(ctx, missing)
	if !errors.Is(err, ErrUnavailable) || !strings.Contains(err.Error(), "/nonexistent/libvirt-sock") || !strings.Contains(err.Error(), "libvirtd running") {
		t.Errorf("no socket: got %v", err)
	}
	t.Logf("no socket: %v", err)

	stale := filepath.Join(t.TempDir(), "libvirt-sock")
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: stale, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	l.SetUnlinkOnClose(false)
	l.Close()
	_, err = Connect(ctx, "qemu:///system?socket="+stale)
	if !errors.Is(err, ErrUnavailable) {
		t.Errorf("stale socket: got %v, want ErrUnavailable", err)
	}
	t.Logf("stale socket: %v", err)

	// A libvirtd of our own, to stop under a live connection.
	if os.Geteuid() != 0 {
		if testutil.Required("libvirt") {
			t.Fatal("a private libvirtd needs root")
		}
		t.Skip("a private libvirtd needs root")
	}
	dir := t.TempDir()
	sock, err := libvirtdScript("start", dir)
	if err != nil {
		t.Fatal(err)
	}
	stopped := false
	t.Cleanup(func() {
		if !stopped {
			libvirtdScript("stop", dir)
		}
	})
	c := connect(t, "qemu:///system?socket="+sock)
	if _, err := c.Status(ctx, "cvd-none"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("status on a live libvirtd: %v", err)
	}

	// Hung: a stopped process answers nothing; the context still bounds the call.
	pidb, err := os.ReadFile(filepath.Join(dir, "libvirtd.pid"))
	if err != nil {
		t.Fatal(err)
	}
	pid, _ := strconv.Atoi(strings.TrimSpace(string(pidb)))
	if err := syscall.Kill(pid, syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	hctx, hcancel := context.WithTimeout(ctx, 500*time.Millisecond)
	start := time.Now()
	_, err = c.Status(hctx, "cvd-none")
	hcancel()
	syscall.Kill(pid, syscall.SIGCONT)
	if !errors.Is(err, context.DeadlineExceeded) || time.Since(start) > 2*time.Second {
		t.Errorf("status on a hung libvirtd: %v after %v, want DeadlineExceeded after 0.5s", err, time.Since(start))
	}

	if _, err := libvirtdScript("stop", dir); err != nil {
		t.Fatal(err)
	}
	stopped = true
	start = time.Now()
	_, err = c.Status(ctx, "cvd-none")
	if !errors.Is(err, ErrUnavailable) || !strings.Contains(err.Error(), "cvd-none") {
		t.Errorf("status after libvirtd stopped: got %v, want ErrUnavailable", err)
	}
	t.Logf("libvirtd gone under a connection: %v (after %v)", err, time.Since(start).Round(time.Millisecond))
	if _, err := Connect(ctx, "qemu:///system?socket="+sock); !errors.Is(err, ErrUnavailable) {
		t.Errorf("connect after libvirtd stopped: got %v, want ErrUnavailable", err)
	}
	c.Close()
	if _, err := c.Status(ctx, "cvd-none"); !errors.Is(err, ErrClosed) {
		t.Errorf("status on a closed Conn: got %v, want ErrClosed", err)
	}
}
