package main

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/cvd-project/cvd/disk"
	"github.com/cvd-project/cvd/hypervisor"
	"github.com/cvd-project/cvd/internal/testutil"
	"github.com/cvd-project/cvd/syncd"
	"github.com/cvd-project/cvd/syncd/laptop"
)

// groupDevice is a device of the test's desktop group: its own store and its
// own libvirtd.
type groupDevice struct {
	t     *testing.T
	bin   string
	store string
	uri   string
	token string
	conn  *hypervisor.Conn
	env   []string // more environment for its commands
}

// cvd runs the binary on the device's store with its libvirtd as the VM hooks'
// connection, returning stdout (JSON) and the error.
func (d *groupDevice) cvd(args ...string) (string, error) {
	cmd := cvdProc(d.bin, d.store, args...)
	cmd.Env = append(append(cmd.Env, "CVD_CONNECT="+d.uri, "CVD_TOKEN="+d.token), d.env...)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	if err != nil {
		return out.String() + errb.String(), err
	}
	return out.String(), nil
}

func (d *groupDevice) must(v any, args ...string) {
	d.t.Helper()
	out, err := d.cvd(args...)
	if err != nil {
		d.t.Fatalf("cvd %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	if v != nil {
		if err := json.Unmarshal([]byte(out), v); err != nil {
			d.t.Fatalf("cvd %s: %v\n%s", strings.Join(args, " "), err, out)
		}
	}
}

// read reads n bytes at off through the device's top of a disk.
func (d *groupDevice) read(dn string, off, n int64) []byte {
	d.t.Helper()
	img, err := disk.Open(filepath.Join(d.store, "desktops", "desk."+dn+".qcow2"), disk.OpenOptions{ReadOnly: true, AllowedRoots: []string{d.store}})
	if err != nil {
		d.t.Fatal(err)
	}
	defer img.Close()
	b := make([]byte, n)
	if _, err := img.ReadAt(b, off); err != nil {
		d.t.Fatal(err)
	}
	return b
}

// agentOnce runs one round of the device's agent (checking in whatever is
// due) and returns its events.
func (d *groupDevice) agentOnce() []laptop.AgentEvent {
	d.t.Helper()
	var round struct {
		Events []laptop.AgentEvent `json:"events"`
		Error  string              `json:"error"`
	}
	d.must(&round, "agent", "--once", "--checkin-every", "1ns")
	if round.Error != "" {
		d.t.Fatalf("agent: %s", round.Error)
	}
	return round.Events
}

// status is the device's record of the desktop.
func (d *groupDevice) status() statusLine {
	d.t.Helper()
	var st []statusLine
	d.must(&st, "status", "desk")
	if len(st) != 1 {
		d.t.Fatalf("status: %+v", st)
	}
	return st[0]
}

// hasEvent reports whether one of evs is action.
func hasEvent(evs []laptop.AgentEvent, action string) bool {
	for _, e := range evs {
		if e.Action == action {
			return true
		}
	}
	return false
}

// runGuest starts the device's VM of the desktop and waits for the tiny guest
// to power off.
func (d *groupDevice) runGuest(ctx context.Context) string {
	d.t.Helper()
	if err := d.conn.Start(ctx, "desk"); err != nil {
		d.t.Fatal(err)
	}
	if _, err := d.conn.Wait(ctx, "desk"); err != nil {
		d.t.Fatal(err)
	}
	log, _ := os.ReadFile(filepath.Join(d.store, "logs", "desk.serial.log"))
	return string(log)
}

// TestDeviceGroupVMs is the device group with real VMs: one desktop whose boot
// configuration (the tiny guest's kernel, initrd and command line) travels with
// it, laptop A (full, class hw1), PC B (apps, class hw2: the common base plus
// a driver layer) and the data-center host (full, its class detected from its
// hypervisor), each with its own store and its own libvirtd. A's guest writes a
// system and a user pattern; A's agent pushes them. B's VM runs (with a local
// edit of its command line) while B's agent stages them; its domain keeps its
// chain until it stops; at its next start it reads A's patterns over its own
// driver layer, its edit kept, its identity its own. B's system push is
// refused naming A, its user push lands. B opens the desktop with A
// unreachable: after the wait A's lease is broken, and A's later check-in is a
// conflict version. Then A runs it in the data center (open --remote): the
// host's agent opens and starts it and the console address it reports is what
// virsh domdisplay says. Every layer checks clean and no version is lost.
func TestDeviceGroupVMs(t *testing.T) {
	env := setupVMEnv(t)
	root, _ := filepath.Abs(filepath.Join("..", ".."))
	uriB, err := startPrivateLibvirtd(t, root)
	if err != nil {
		t.Fatal(err)
	}
	uriDC, err := startPrivateLibvirtd(t, root)
	if err != nil {
		t.Fatal(err)
	}
	bin := buildCvd(t)
	work := t.TempDir()
	srv := filepath.Join(work, "server")
	ctx, cancel := context.WithTimeout(context.Background(), 8*time.Minute)
	defer cancel()

	// The server: a base, hw2's driver layer, the desktop and its boot.
	base, drv := filepath.Join(work, "base.qcow2"), filepath.Join(work, "drv.qcow2")
	testutil.Run(t, "qemu-img", "create", "-q", "-f", "qcow2", base, "64M")
	testutil.Run(t, "qemu-io", "-c", "write -P 0x11 0 4M", base)
	testutil.Run(t, "qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", drv)
	testutil.Run(t, "qemu-io", "-c", "write -P 0x77 40M 1M", drv)
	mustCvd(t, srv, "layer", "import", base, "--kind", "base", "--name", "os:1")
	mustCvd(t, srv, "layer", "import", drv, "--kind", "app", "--parent", "os:1", "--name", "drv:hw2")
	mustCvd(t, srv, "variant", "add", "hw2", "drv:hw2")
	mustCvd(t, srv, "desktop", "create", "desk", "--base", "os:1", "--user-size", "32M")
	mustCvd(t, srv, "desktop", "boot", "desk", "--kernel", env.kernel, "--initrd", env.initrd, "--memory", "256",
		"--cmdline", env.cmdline+" cvd.seed=/dev/vdc cvd.user=/dev/vdb cvd.pattern=0xa1 cvd.user_pattern=0xb2 cvd.user_off=1048576")
	var added struct {
		Token string `json:"token"`
	}
	devs := map[string]*groupDevice{}
	for _, d := range []struct{ name, uri string }{{"lap-a", env.uri}, {"pc-b", uriB}, {"dc", uriDC}} {
		args := []string{"--json", "device", "add", d.name, "--desktop", "desk"}
		switch d.name {
		case "lap-a":
			args = append(args, "--class", "hw1")
		case "pc-b":
			args = append(args, "--policy", "apps", "--class", "hw2")
		case "dc":
			args = append(args, "--host")
		}
		json.Unmarshal([]byte(mustCvd(t, srv, args...)), &added)
		conn := deskConn(ctx, t, d.uri)
		devs[d.name] = &groupDevice{t: t, bin: bin, store: filepath.Join(work, d.name), uri: d.uri, token: added.Token, conn: conn}
	}
	a, b, dc := devs["lap-a"], devs["pc-b"], devs["dc"]
	dc.env = []string{"CVD_VNC_LISTEN=127.0.0.1"}
	p := startServeAt(t, bin, srv, "127.0.0.1:0", "--min-role-interval", "-1s")

	// A opens the desktop and its guest runs: system and user patterns.
	var op laptop.OpenReport
	a.must(&op, "open", "desk", "--server", p.url)
	log := a.runGuest(ctx)
	if !strings.Contains(log, "user pattern 0xb2") {
		t.Fatalf("A's guest did not write its user disk:\n%s", log)
	}
	hostA := string(bytes.TrimRight(a.read("system", vmHostOff, 512), "\x00"))
	// A's agent pushes them (the VM is down).
	if evs := a.agentOnce(); !hasEvent(evs, "checked-in") {
		t.Fatalf("A's agent did not push: %+v", evs)
	}
	ciA := laptop.CheckinReport{Version: a.status().Version}

	// B (provisioned with hw2's base) follows; its VM runs with a local edit.
	lines := strings.Fields(mustCvd(t, b.store, "layer", "import", base, "--kind", "base"))
	mustCvd(t, b.store, "layer", "import", drv, "--kind", "app", "--parent", lines[len(lines)-1])
	var fb laptop.FollowReport
	b.must(&fb, "follow", "desk", "--server", p.url, "--apply")
	if fb.Policy != "apps" || fb.Runs != ciA.Version {
		t.Fatalf("B follows: %+v", fb)
	}
	x, err := b.conn.DumpXML(ctx, "desk")
	if err != nil {
		t.Fatal(err)
	}
	if err := b.conn.DefineXML(ctx, "desk", strings.Replace(x, "cvd.user_off=1048576", "cvd.user_off=1048576 cvd.hold=-1", 1)); err != nil {
		t.Fatal(err)
	}
	// A pushes a second version while B runs.
	testutil.Run(t, "qemu-io", "-c", "write -P 0xa2 20M 1M", filepath.Join(a.store, "desktops", "desk.system.qcow2"))
	var ciA2 laptop.CheckinReport
	a.must(&ciA2, "checkin", "desk")
	if err := b.conn.Start(ctx, "desk"); err != nil {
		t.Fatal(err)
	}
	infoBefore, _ := b.conn.Info(ctx, "desk")
	// B's agent stages it in the background; the running VM's chain stays.
	if evs := b.agentOnce(); !hasEvent(evs, "staged") || hasEvent(evs, "applied") {
		t.Fatalf("B's agent while its VM runs: %+v", evs)
	}
	if st := b.status(); st.Staged != ciA2.Version || st.Version != ciA.Version {
		t.Fatalf("B's status while its VM runs: %+v", st)
	}
	infoRunning, _ := b.conn.Info(ctx, "desk")
	if infoRunning.Disks[0].Chain[1].Path != infoBefore.Disks[0].Chain[1].Path {
		t.Fatalf("staging moved B's running chain: %v → %v", infoBefore.Disks[0].Chain, infoRunning.Disks[0].Chain)
	}
	if err := b.conn.Destroy(ctx, "desk"); err != nil {
		t.Fatal(err)
	}
	// B's next start: the update applies, on hw2's variant, its edit kept.
	if evs := b.agentOnce(); !hasEvent(evs, "applied") {
		t.Fatalf("B's agent once its VM is down: %+v", evs)
	}
	if st := b.status(); st.Staged != 0 || st.Version != ciA2.Version {
		t.Fatalf("B's status after its next start: %+v", st)
	}
	for _, c := range []struct {
		dn   string
		off  int64
		want byte
		what string
	}{{"system", vmPatternOff, 0xa1, "A's guest's system pattern"}, {"system", 20 << 20, 0xa2, "A's second version"},
		{"user", 1 << 20, 0xb2, "A's guest's user pattern"}, {"system", 40 << 20, 0x77, "its own driver layer"}} {
		if got := b.read(c.dn, c.off, 4096); !bytes.Equal(got, bytes.Repeat([]byte{c.want}, 4096)) {
			t.Errorf("B does not read %s", c.what)
		}
	}
	x, _ = b.conn.DumpXML(ctx, "desk")
	var st []statusLine
	b.must(&st, "status", "desk")
	if !strings.Contains(x, "cvd.hold=-1") || len(st) != 1 || !strings.Contains(x, st[0].Layers["system"]) {
		t.Fatalf("B's domain after the update lost its edit or its new chain:\n%s", x)
	}
	// B's guest boots with B's own identity; put it back to power off.
	b.conn.DefineXML(ctx, "desk", strings.Replace(x, " cvd.hold=-1", "", 1))
	log = b.runGuest(ctx)
	hostB := string(bytes.TrimRight(b.read("system", vmHostOff, 512), "\x00"))
	if hostB == "" || hostB == hostA || !strings.Contains(log, "hostname "+hostB) {
		t.Fatalf("hostnames: A %q, B %q (each device's own)\n%s", hostA, hostB, log)
	}

	// B's system push is refused while inactive, naming A; its user push lands.
	if out, err := b.cvd("checkin", "desk"); err == nil || !strings.Contains(out, "lap-a") {
		t.Fatalf("B's system push while inactive: %v\n%s", err, out)
	}
	var ciB laptop.CheckinReport
	b.must(&ciB, "checkin", "desk", "--user-only")
	if ciB.Conflict || ciB.Head != ciB.Version {
		t.Fatalf("B's user push: %+v", ciB)
	}

	// B opens the desktop; A does not answer: after the wait, its lease is
	// broken and B becomes active; A's later check-in is a conflict version.
	var ob laptop.OpenReport
	b.must(&ob, "open", "desk", "--wait", "2s")
	if ob.Snapshot == 0 || !ob.Broken || ob.Previous != "lap-a" {
		t.Fatalf("B opens with A unreachable: %+v", ob)
	}
	testutil.Run(t, "qemu-io", "-c", "write -P 0xa3 24M 1M", filepath.Join(a.store, "desktops", "desk.system.qcow2"))
	var late laptop.CheckinReport
	a.must(&late, "checkin", "desk")
	if !late.Conflict {
		t.Fatalf("A's check-in after B took the role: %+v", late)
	}
	// From A, the desktop runs in the data center: the host's agent opens it
	// (B, unreachable, loses the role after the wait), starts its VM and
	// reports the console address, which virsh confirms.
	dc.must(nil, "follow", "desk", "--server", p.url)
	x, err = dc.conn.DumpXML(ctx, "desk")
	if err != nil {
		t.Fatal(err)
	}
	if err := dc.conn.DefineXML(ctx, "desk", strings.Replace(x, "cvd.user_off=1048576", "cvd.user_off=1048576 cvd.hold=-1", 1)); err != nil {
		t.Fatal(err)
	}
	agentDone := make(chan string, 1)
	go func() {
		var all strings.Builder
		for deadline := time.Now().Add(2 * time.Minute); time.Now().Before(deadline); time.Sleep(300 * time.Millisecond) {
			out, _ := dc.cvd("agent", "--once", "--checkin-every", "0")
			all.WriteString(out)
			if strings.Contains(out, "running-here") {
				break
			}
		}
		agentDone <- all.String()
	}()
	var rr laptop.RemoteReport
	a.must(&rr, "open", "desk", "--remote", "--wait", "2s")
	agentLog := <-agentDone
	display := strings.TrimSpace(testutil.Run(t, "virsh", "-c", uriDC, "domdisplay", "desk"))
	if rr.Device != "dc" || rr.Console == "" || rr.Console != display {
		t.Fatalf("open --remote: %+v; virsh domdisplay says %q\nthe host's agent:\n%s", rr, display, agentLog)
	}
	t.Logf("open --remote: desk runs on %s, console %s (virsh domdisplay: %s)", rr.Device, rr.Console, display)
	dc.conn.Destroy(ctx, "desk")

	var members []syncd.GroupMember
	json.Unmarshal([]byte(mustCvd(t, srv, "--json", "desktop", "devices", "desk")), &members)
	t.Logf("device group: %+v", members)
	for _, m := range members {
		switch m.Device {
		case "dc":
			if !strings.HasSuffix(m.Class, "-virtio") {
				t.Errorf("%s registered without a class reports %q, want its hypervisor's", m.Device, m.Class)
			}
		case "lap-a", "pc-b":
			if m.Class != map[string]string{"lap-a": "hw1", "pc-b": "hw2"}[m.Device] {
				t.Errorf("%s's class given at registration became %q", m.Device, m.Class)
			}
		}
	}
	var vs syncd.DesktopVersions
	json.Unmarshal([]byte(mustCvd(t, srv, "--json", "desktop", "versions", "desk")), &vs)
	for _, n := range []int{ciA.Version, ciA2.Version, ciB.Version, ob.Snapshot, late.Version} {
		found := false
		for _, v := range vs.Versions {
			found = found || v.N == n
		}
		if !found {
			t.Errorf("version %d is gone", n)
		}
	}
	for _, dir := range []string{srv, a.store, b.store, dc.store} {
		layers, _ := filepath.Glob(filepath.Join(dir, "layers", "*.qcow2"))
		for _, l := range layers {
			testutil.QemuCheck(t, l)
		}
	}
}
