package main

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/cvd-project/cvd/hypervisor"
	"github.com/cvd-project/cvd/internal/testutil"
	"github.com/cvd-project/cvd/syncd/laptop"
)

// TestStreamedGuest: `cvd checkout --stream` returns before the layers have
// arrived and defines the desktop's VM on the NBD exports of its chains; the
// tiny guest boots from it under libvirt, writes its pattern (the rest of the
// cluster copied up through the export) and powers off; cvd status shows the
// export and how much is local; cvd pin --wait fetches the rest, switches to
// the local files, and the check-in lands with the guest's writes. A second
// device's streamed check-out then fetches the working set the first one
// reported before its guest reads it.
func TestStreamedGuest(t *testing.T) {
	env := setupVMEnv(t)
	bin := buildCvd(t)
	work := t.TempDir()
	srv := filepath.Join(work, "server")
	ctx, cancel := context.WithTimeout(context.Background(), 8*time.Minute)
	defer cancel()

	p, conn := guestSite(ctx, t, env, bin, srv, "256M", "0xa1", "write -P 0x11 0 4M", "write -P 0x33 16M 60M")
	device := func(name string) *groupDevice {
		var added struct {
			Token string `json:"token"`
		}
		json.Unmarshal([]byte(mustCvd(t, srv, "--json", "device", "add", name, "--desktop", "desk")), &added)
		d := &groupDevice{t: t, bin: bin, store: filepath.Join(work, name), uri: env.uri, token: added.Token, conn: conn}
		t.Cleanup(func() { d.cvd("stream", "stop", "desk") })
		return d
	}
	boot := func(d *groupDevice) (string, laptop.StreamStatus) {
		t.Helper()
		log := d.runGuest(ctx)
		if !strings.Contains(log, "cvd-guest: pattern 0xa1") || !strings.Contains(log, "cvd-guest: poweroff") || strings.Contains(log, "error") {
			t.Fatalf("the guest on the streamed desktop:\n%s", log)
		}
		time.Sleep(1100 * time.Millisecond) // the stream's next status
		return log, *d.status().Stream
	}

	a := device("lap-a")
	var rep struct {
		laptop.StreamReport
		PID int `json:"stream_pid"`
	}
	// A cache budget larger than the desktop: nothing is fetched ahead of use.
	a.must(&rep, "--json", "checkout", "desk", "--server", p.url, "--stream", "--cache-size", "1G")
	t.Logf("streamed check-out: %.3f s, %d entry-list bytes, stream process %d", rep.Took, rep.EntryBytes, rep.PID)
	x, err := conn.DumpXML(ctx, "desk")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(x, "protocol='nbd'") || !strings.Contains(x, rep.Exports["system"][strings.Index(rep.Exports["system"], "socket=")+7:]) {
		t.Fatalf("the domain does not declare the NBD backing store:\n%s", x)
	}
	time.Sleep(1100 * time.Millisecond) // the stream's next status
	st := a.status().Stream
	if st == nil || st.Disks["system"].NBD != rep.Exports["system"] || st.TotalBytes == 0 {
		t.Fatalf("status of the streamed desktop: %+v", st)
	}
	// No working set known yet, no background fill: nothing comes before the guest reads.
	if st.Fetched != 0 {
		t.Fatalf("first device before its start: %+v", st.StreamStats)
	}
	t.Logf("first device: before the start %d bytes fetched", st.Fetched)
	_, stA := boot(a)
	t.Logf("first device, guest powered off: %+v", stA.StreamStats)
	if stA.LocalBytes >= stA.TotalBytes || stA.FetchedOnUse == 0 {
		t.Fatalf("after the boot: %+v", stA.StreamStats)
	}
	top := st.Disks["system"].Top
	// The guest's pattern, and the rest of its cluster copied up through the export.
	testutil.Run(t, "qemu-io", "-r", "-f", "qcow2", "-c", "read -P 0xa1 1M 4k", "-c", "read -P 0x11 1052672 61440", top)

	var pin struct {
		Complete, Switched bool
	}
	a.must(&pin, "--json", "pin", "desk", "--wait")
	if !pin.Complete || !pin.Switched {
		t.Fatalf("pin: %+v", pin)
	}
	if _, err := os.Stat(top); !os.IsNotExist(err) {
		t.Fatalf("the streamed top is still there after the switch: %v", err)
	}
	var ci laptop.CheckinReport
	a.must(&ci, "--json", "checkin", "desk", "--release")
	if ci.ChangedBytes == 0 {
		t.Fatalf("check-in after the switch: %+v", ci)
	}

	// A second device: the working set comes first.
	b := device("lap-b")
	b.must(nil, "--json", "checkout", "desk", "--server", p.url, "--stream", "--cache-size", "64M")
	time.Sleep(1100 * time.Millisecond)
	before := *b.status().Stream
	_, stB := boot(b)
	t.Logf("second device: before the start %d bytes fetched; guest powered off: %+v", before.Fetched, stB.StreamStats)
	if before.Fetched == 0 || stB.Waits >= stA.Waits {
		t.Fatalf("second device: before %+v, after %+v (first: %+v)", before.StreamStats, stB.StreamStats, stA.StreamStats)
	}
	testutil.Run(t, "qemu-io", "-r", "-f", "qcow2", "-c", "read -P 0xa1 1M 4k", b.status().Stream.Disks["system"].Top)
}

// guestSite serves a store at srv whose desktop "desk" boots the tiny guest
// (writing pattern) from a base of size written by the qemu-io commands, and
// connects to the test's libvirtd; the desktop's domain goes at the end.
func guestSite(ctx context.Context, t *testing.T, env *vmEnv, bin, srv, size, pattern string, writes ...string) (*serveProc, *hypervisor.Conn) {
	t.Helper()
	base := filepath.Join(t.TempDir(), "base.qcow2")
	testutil.Run(t, "qemu-img", "create", "-q", "-f", "qcow2", base, size)
	var io []string
	for _, w := range writes {
		io = append(io, "-c", w)
	}
	testutil.Run(t, "qemu-io", append(io, base)...)
	mustCvd(t, srv, "layer", "import", base, "--kind", "base", "--name", "os:1")
	mustCvd(t, srv, "desktop", "create", "desk", "--base", "os:1", "--user-size", "32M")
	mustCvd(t, srv, "desktop", "boot", "desk", "--kernel", env.kernel, "--initrd", env.initrd, "--memory", "256",
		"--cmdline", env.cmdline+" cvd.seed=/dev/vdc cvd.user=/dev/vdb cvd.pattern="+pattern)
	p := startServeAt(t, bin, srv, "127.0.0.1:0")
	return p, deskConn(ctx, t, env.uri)
}

// deskConn connects to libvirtd at uri; the domain "desk" is destroyed and
// undefined when the test ends.
func deskConn(ctx context.Context, t *testing.T, uri string) *hypervisor.Conn {
	t.Helper()
	conn, err := hypervisor.Connect(ctx, uri)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		conn.Destroy(context.Background(), "desk")
		conn.Undefine(context.Background(), "desk", 0)
		conn.Close()
	})
	return conn
}
