package main

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/cvd-project/cvd/syncd/laptop"

	"github.com/cvd-project/cvd/disk"
	"github.com/cvd-project/cvd/hypervisor"
	"github.com/cvd-project/cvd/internal/testutil"
)

// TestCheckinRunningGuest: with the tiny guest running (under a private
// libvirtd) on the chain of a laptop's checked-out desktop, `cvd checkin`
// refuses and changes nothing, with CVD_CONNECT naming that libvirtd and again
// with no libvirt reachable at all; after the guest powers off, the check-in
// lands and the server's head reads as the laptop's chain.
func TestCheckinRunningGuest(t *testing.T) {
	env := setupVMEnv(t)
	s := newSyncServer(t)
	bin := buildCvd(t)
	lap := filepath.Join(t.TempDir(), "laptop")
	withEnv := func(cmd *exec.Cmd, vars ...string) *exec.Cmd {
		cmd.Env = append(cmd.Env, vars...)
		return cmd
	}
	co := withEnv(cvdProc(bin, lap, "checkout", "desk", "--server", s.http.URL, "--token", s.token), "CVD_CONNECT="+env.uri)
	if out, err := co.CombinedOutput(); err != nil {
		t.Fatalf("checkout: %v\n%s", err, out)
	}
	top := filepath.Join(lap, "desktops", "desk.system.qcow2")

	// The guest runs on the laptop's system chain: its top is the file it writes.
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	conn, err := hypervisor.Connect(ctx, env.uri)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	img, err := disk.Open(top, disk.OpenOptions{ReadOnly: true, AllowedRoots: []string{lap}})
	if err != nil {
		t.Fatal(err)
	}
	var chain []disk.Info
	for _, l := range disk.Layers(img) {
		chain = append(chain, l.Info())
	}
	img.Close()
	seed := filepath.Join(t.TempDir(), "seed.raw")
	os.WriteFile(seed, append([]byte("local-hostname: laptop-guest\n"), make([]byte, 1<<20)...), 0o644)
	name := "desk-guest"
	serial := filepath.Join(t.TempDir(), "serial.log")
	spec := hypervisor.DomainSpec{Name: name, Disks: []hypervisor.DiskSpec{{Chain: chain, Target: "vda"}}, SeedISO: seed,
		Kernel: env.kernel, Initrd: env.initrd, Cmdline: env.cmdline + " cvd.loop=8 cvd.loop_ms=100", SerialLog: serial,
		Metadata: hypervisor.Metadata{Desktop: "desk", Clone: name}}
	if err := conn.Define(ctx, spec); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		conn.Destroy(context.Background(), name)
		conn.Undefine(context.Background(), name, 0)
	})
	if err := conn.Start(ctx, name); err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(2 * time.Minute); ; time.Sleep(50 * time.Millisecond) {
		if busy, _ := disk.InUse(top); busy {
			break
		}
		if time.Now().After(deadline) {
			log, _ := os.ReadFile(serial)
			t.Fatalf("the guest never held its top open\n%s", log)
		}
	}
	headBefore := s.head()
	for _, vars := range [][]string{{"CVD_CONNECT=" + env.uri}, {"CVD_CONNECT=", "LIBVIRT_DEFAULT_URI=qemu:///system?socket=/nonexistent/libvirt-sock"}} {
		var out bytes.Buffer
		ci := withEnv(cvdProc(bin, lap, "checkin", "desk"), vars...)
		ci.Stdout, ci.Stderr = &out, &out
		if err := ci.Run(); err == nil {
			t.Fatalf("check-in of a running guest (%v) succeeded:\n%s", vars, out.String())
		}
		if !strings.Contains(out.String(), "in use") && !strings.Contains(out.String(), "running") {
			t.Errorf("check-in of a running guest (%v): the error does not say why:\n%s", vars, out.String())
		}
		if h := s.head(); h.N != headBefore.N {
			t.Fatalf("a refused check-in moved the server's head to %d", h.N)
		}
		if got := filepath.Join(lap, "desktops", "desk.system.qcow2"); got != top {
			t.Fatalf("the laptop's top moved")
		}
	}
	st, err := conn.Wait(ctx, name)
	if err != nil {
		t.Fatal(err)
	}
	log, _ := os.ReadFile(serial)
	if !strings.Contains(string(log), "loop done") {
		t.Fatalf("the guest did not finish its writes (%v):\n%s", st, log)
	}
	var rep laptop.CheckinReport
	ci := withEnv(cvdProc(bin, lap, "checkin", "desk"), "CVD_CONNECT="+env.uri)
	out, err := ci.Output()
	if err != nil {
		t.Fatalf("check-in after the guest powered off: %v\n%s", err, out)
	}
	if err := json.Unmarshal(out, &rep); err != nil {
		t.Fatal(err)
	}
	head := s.head()
	if head.N != headBefore.N+1 || head.System != rep.Layers["system"] {
		t.Fatalf("after the check-in: head %+v, report %+v", head, rep)
	}
	// The laptop's frozen chain (its new top is empty on the committed layer)
	// and the server's head read the same.
	if !testutil.QemuCompare(t, s.store.LayerPath(head.System), filepath.Join(lap, "desktops", "desk.system.qcow2")) {
		t.Error("the server's head does not read as the laptop's chain")
	}
	t.Logf("guest wrote %d clusters; the check-in sent %d (%d bytes)", rep.Changed, rep.Sent, rep.Payload)
	mustCvd(t, lap, "store", "check")
	checkQcow2Under(t, lap)
}
