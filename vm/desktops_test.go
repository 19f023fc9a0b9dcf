package vm

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/cvd-project/cvd/hypervisor"
	"github.com/cvd-project/cvd/internal/testutil"
)

// TestDesktopHooks runs the VM hooks of sync against libvirt's test driver (on
// a private libvirtd when no system one answers): a desktop's domain is defined
// over its whole chains, redefined keeping its UUID, stopped (a missing domain is
// not an error) and undefined.
func TestDesktopHooks(t *testing.T) {
	if testing.Short() {
		t.Skip("starts libvirtd")
	}
	testutil.NeedQemu(t)
	testutil.NeedTool(t, "libvirt", "libvirtd")
	sock := hypervisor.DefaultSocket
	if _, err := os.Stat(sock); err != nil {
		dir := t.TempDir()
		out, err := exec.Command(filepath.Join("..", "scripts", "libvirtd.sh"), "start", dir).Output()
		if err != nil {
			t.Fatalf("start a private libvirtd: %v", err)
		}
		sock = strings.TrimSpace(string(out))
		t.Cleanup(func() { exec.Command(filepath.Join("..", "scripts", "libvirtd.sh"), "stop", dir).Run() })
	}
	vms := &Desktops{URI: "test:///default?socket=" + sock, Log: slog.Default()}
	defer vms.Close()
	ctx := context.Background()
	dir := t.TempDir()
	base, top, user := filepath.Join(dir, "base.qcow2"), filepath.Join(dir, "top.qcow2"), filepath.Join(dir, "user.qcow2")
	testutil.Run(t, "qemu-img", "create", "-q", "-f", "qcow2", base, "64M")
	testutil.Run(t, "qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top)
	testutil.Run(t, "qemu-img", "create", "-q", "-f", "qcow2", user, "32M")
	name := fmt.Sprintf("cvd-sync-test-%d", time.Now().UnixNano()%1e9)
	t.Cleanup(func() { vms.UndefineDesktop(context.Background(), name) })
	if stopped, err := vms.StopDesktop(ctx, name, time.Second); err != nil || stopped {
		t.Fatalf("stop a desktop without a domain: %v %v", stopped, err)
	}
	if err := vms.DefineDesktop(ctx, DesktopVM{Name: name, SystemTop: top, UserTop: user}); err != nil {
		t.Fatal(err)
	}
	conn, err := vms.connect(ctx) // the test driver's domains live on this connection
	if err != nil || conn == nil {
		t.Fatal(err)
	}
	info, err := conn.Info(ctx, name)
	if err != nil {
		t.Fatal(err)
	}
	if len(info.Disks) != 2 || len(info.Disks[0].Chain) != 2 || info.Disks[0].Chain[1].Path != base || info.Disks[1].Target != "vdb" {
		t.Fatalf("domain disks: %+v", info.Disks)
	}
	if err := vms.DefineDesktop(ctx, DesktopVM{Name: name, SystemTop: top, ApplyBoot: true}); err != nil {
		t.Fatalf("redefine: %v", err)
	}
	again, _ := conn.Info(ctx, name)
	if again.UUID != info.UUID || len(again.Disks) != 1 {
		t.Fatalf("redefined: %+v (was %s)", again, info.UUID)
	}
	if vms.Running(ctx, name) {
		t.Fatal("a defined domain runs")
	}
	if err := vms.UndefineDesktop(ctx, name); err != nil {
		t.Fatal(err)
	}
	if _, err := conn.Info(ctx, name); !errors.Is(err, hypervisor.ErrNotFound) {
		t.Fatalf("after undefine: %v", err)
	}
}
