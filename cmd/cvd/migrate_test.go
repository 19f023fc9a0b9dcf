package main

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/cvd-project/cvd/syncd/laptop"

	"github.com/cvd-project/cvd/internal/testutil"
	"github.com/cvd-project/cvd/syncd"
	"github.com/cvd-project/cvd/syncd/proto"
)

// boltRelease is the last commit whose stores keep their records in bbolt files
// (cvd.db and sync/syncd.db) instead of the SQL catalog.
const boltRelease = "d620107e734a598064ba50a09d6ac03b9a1b6132"

// buildRelease builds cvd as it was at commit, from this repository's history.
func buildRelease(t *testing.T, commit string) string {
	t.Helper()
	top, err := exec.Command("git", "rev-parse", "--show-toplevel").Output()
	if err == nil {
		err = exec.Command("git", "-C", strings.TrimSpace(string(top)), "cat-file", "-e", commit+"^{commit}").Run()
	}
	if err != nil {
		// A shallow clone does not hold the previous release: nothing to build.
		shallow, _ := exec.Command("git", "rev-parse", "--is-shallow-repository").Output()
		if testutil.Required("git") && strings.TrimSpace(string(shallow)) != "true" {
			t.Fatalf("commit %s is not in this checkout's history: %v", commit, err)
		}
		t.Skipf("commit %s is not in this checkout's history (set CVD_TEST_REQUIRE=git to fail)", commit)
	}
	src := t.TempDir()
	archive := exec.Command("git", "-C", strings.TrimSpace(string(top)), "archive", commit)
	untar := exec.Command("tar", "-x", "-C", src)
	untar.Stdin, _ = archive.StdoutPipe()
	if err := untar.Start(); err != nil {
		t.Fatal(err)
	}
	var errb strings.Builder
	archive.Stderr = &errb
	if err := archive.Run(); err != nil {
		t.Fatalf("git archive %s: %v\n%s", commit, err, errb.String())
	}
	if err := untar.Wait(); err != nil {
		t.Fatalf("untar: %v", err)
	}
	bin := filepath.Join(t.TempDir(), "cvd-"+commit[:7])
	build := exec.Command("go", "build", "-o", bin, "./cmd/cvd")
	build.Dir = src
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("build cvd at %s: %v\n%s", commit, err, out)
	}
	return bin
}

// serveProc is a `cvd serve` process of a test.
type serveProc struct {
	url     string
	cmd     *exec.Cmd
	done    chan struct{}
	stopped bool
}

// stop ends the server with SIGTERM (SIGKILL after 30 s) and waits for it.
func (p *serveProc) stop() { p.signal(syscall.SIGTERM) }

// kill ends the server with SIGKILL and waits for it.
func (p *serveProc) kill() { p.signal(syscall.SIGKILL) }

func (p *serveProc) signal(sig syscall.Signal) {
	if p.stopped {
		return
	}
	p.stopped = true
	p.cmd.Process.Signal(sig)
	select {
	case <-p.done:
	case <-time.After(30 * time.Second):
		p.cmd.Process.Kill()
		<-p.done
	}
}

// startServe starts `cvd serve` on a free loopback port; the server is stopped
// when the test ends.
func startServe(t *testing.T, bin, store string) *serveProc {
	t.Helper()
	return startServeAt(t, bin, store, "127.0.0.1:0")
}

// startServeAt starts `cvd serve` listening on addr.
func startServeAt(t *testing.T, bin, store, addr string, extra ...string) *serveProc {
	t.Helper()
	cmd := exec.Command(bin, append([]string{"--store", store, "serve", "--listen", addr}, extra...)...)
	cmd.Env = append(os.Environ(), "CVD_STORE=", "CVD_CONNECT=")
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	logf, _ := os.Create(filepath.Join(t.TempDir(), "serve.log"))
	cmd.Stderr = logf
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	p := &serveProc{cmd: cmd, done: make(chan struct{})}
	go func() { cmd.Wait(); close(p.done) }()
	t.Cleanup(p.stop)
	line, err := bufio.NewReader(out).ReadString('\n')
	m := regexp.MustCompile(`on (https?://\S+)`).FindStringSubmatch(line)
	if err != nil || m == nil {
		p.stop()
		log, _ := os.ReadFile(logf.Name())
		t.Fatalf("cvd serve did not start: %q %v\n%s", line, err, log)
	}
	go io.Copy(io.Discard, out)
	p.url = m[1]
	return p
}

// TestMigrateBoltStore: a server store and a laptop store written by the bbolt
// release (layers, a desktop with versions, a clone, a device, an active lease,
// and a check-in interrupted after its upload) are moved into the catalog by the
// first command of this binary; nothing is lost, and the check-in resumes and
// commits with the server's head reading as the laptop's chain.
func TestMigrateBoltStore(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the previous release")
	}
	testutil.NeedQemu(t)
	old := buildRelease(t, boltRelease)
	bin := buildCvd(t)
	work := t.TempDir()
	srv, lap := filepath.Join(work, "server"), filepath.Join(work, "laptop")
	run := func(bin, store string, args ...string) string {
		t.Helper()
		cmd := exec.Command(bin, append([]string{"--store", store}, args...)...)
		cmd.Env = append(os.Environ(), "CVD_STORE=", "CVD_CONNECT=")
		out, err := cmd.Output()
		if err != nil {
			var stderr []byte
			if ee, ok := err.(*exec.ExitError); ok {
				stderr = ee.Stderr
			}
			t.Fatalf("%s %s: %v\n%s%s", filepath.Base(bin), strings.Join(args, " "), err, out, stderr)
		}
		return string(out)
	}

	// The previous release writes both stores.
	base := filepath.Join(work, "base.qcow2")
	testutil.Run(t, "qemu-img", "create", "-q", "-f", "qcow2", base, "1G")
	testutil.Run(t, "qemu-io", "-c", "write -P 0x11 0 32M", "-c", "write -P 0x22 256M 8M", base)
	run(old, srv, "layer", "import", base, "--kind", "base", "--name", "os:1")
	run(old, srv, "desktop", "create", "desk", "--base", "os:1", "--user-size", "64M")
	run(old, srv, "clone", "desk", "--name", "c1")
	var added struct {
		Token string `json:"token"`
	}
	json.Unmarshal([]byte(run(old, srv, "--json", "device", "add", "lap", "--desktop", "desk")), &added)
	if added.Token == "" {
		t.Fatal("the previous release gave no device token")
	}
	oldSrv := startServe(t, old, srv)
	// The laptop talks to the server through a proxy that fails every commit:
	// the check-in is uploaded in full and then interrupted.
	target, _ := url.Parse(oldSrv.url)
	rp := httputil.NewSingleHostReverseProxy(target)
	proxy := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method == http.MethodPost && strings.HasSuffix(r.URL.Path, "/commit") {
			w.Header().Set("Content-Type", "application/json")
			w.WriteHeader(http.StatusInternalServerError)
			fmt.Fprint(w, `{"error":"injected: the server went away","code":"internal","status":500}`)
			return
		}
		rp.ServeHTTP(w, r)
	}))
	defer proxy.Close()
	run(old, lap, "checkout", "desk", "--server", proxy.URL, "--token", added.Token)
	wantLayer := laptopWrite(t, lap, 42)
	expected := filepath.Join(work, "expected.qcow2")
	testutil.Run(t, "qemu-img", "convert", "-O", "qcow2", filepath.Join(lap, "desktops", "desk.system.qcow2"), expected)
	ci := exec.Command(old, "--store", lap, "checkin", "desk")
	ci.Env = append(os.Environ(), "CVD_STORE=", "CVD_CONNECT=")
	if out, err := ci.CombinedOutput(); err == nil {
		t.Fatalf("the previous release's check-in committed through a proxy that fails commits:\n%s", out)
	}
	oldSrv.stop()
	for _, f := range []string{filepath.Join(srv, "cvd.db"), filepath.Join(srv, "sync", "syncd.db"), filepath.Join(lap, "cvd.db"), filepath.Join(lap, "sync", "syncd.db")} {
		if _, err := os.Stat(f); err != nil {
			t.Fatalf("the previous release did not write %s: %v", f, err)
		}
	}

	// This binary reads everything the old one wrote.
	count := func(store string, args ...string) int {
		t.Helper()
		var v []json.RawMessage
		out := run(bin, store, append([]string{"--json"}, args...)...)
		if err := json.Unmarshal([]byte(out), &v); err != nil {
			t.Fatalf("cvd %v: %v\n%s", args, err, out)
		}
		return len(v)
	}
	if n := count(srv, "layer", "ls"); n != 1 {
		t.Errorf("server layers after migration: %d, want 1", n)
	}
	if n := count(srv, "desktop", "ls"); n != 1 {
		t.Errorf("server desktops: %d, want 1", n)
	}
	if n := count(srv, "clone", "ls"); n != 1 {
		t.Errorf("server clones: %d, want 1", n)
	}
	if n := count(srv, "device", "ls"); n != 1 {
		t.Errorf("server devices: %d, want 1", n)
	}
	var leases []proto.Lease
	json.Unmarshal([]byte(run(bin, srv, "--json", "device", "leases")), &leases)
	if len(leases) != 1 || leases[0].DeviceName != "lap" || leases[0].Expired(time.Now()) {
		t.Errorf("active lease after migration: %+v", leases)
	}
	var versions syncd.DesktopVersions
	json.Unmarshal([]byte(run(bin, srv, "--json", "desktop", "versions", "desk")), &versions)
	headBefore := versions.Head
	if headBefore == 0 || len(versions.Versions) == 0 {
		t.Fatalf("versions after migration: %+v", versions)
	}
	for _, f := range []string{"cvd.db", "sync/syncd.db"} {
		if _, err := os.Stat(filepath.Join(srv, f)); err == nil {
			t.Errorf("%s is still in place after the migration", f)
		}
		if _, err := os.Stat(filepath.Join(srv, f+".migrated")); err != nil {
			t.Errorf("%s was not kept: %v", f, err)
		}
	}
	run(bin, srv, "store", "check")
	run(bin, lap, "store", "check")

	// The interrupted check-in resumes against this binary's server and commits.
	newSrv := startServe(t, bin, srv)
	var rep laptop.CheckinReport
	runJSON(t, bin, lap, &rep, "checkin", "desk", "--server", newSrv.url)
	newSrv.stop()
	t.Logf("after migration: lease %s until %s; resumed check-in sent %d clusters (%d bytes), %d deduplicated",
		leases[0].DeviceName, leases[0].Expires.Format(time.RFC3339), rep.Sent, rep.Payload, rep.Deduplicated)
	if !rep.Resumed {
		t.Errorf("the check-in did not resume the interrupted one: %+v", rep)
	}
	if rep.Layers["system"] != wantLayer {
		t.Errorf("check-in made layer %s, the laptop's top is %s", rep.Layers["system"], wantLayer)
	}
	json.Unmarshal([]byte(run(bin, srv, "--json", "desktop", "versions", "desk")), &versions)
	head := versions.HeadVersion()
	if versions.Head != headBefore+1 || head == nil || head.System != wantLayer {
		t.Fatalf("after the check-in: head %d (was %d), %+v", versions.Head, headBefore, head)
	}
	n := 0
	for _, v := range versions.Versions {
		if v.System == wantLayer {
			n++
		}
	}
	if n != 1 {
		t.Errorf("the check-in's layer is in %d versions, want 1", n)
	}
	if !testutil.QemuCompare(t, filepath.Join(srv, "layers", wantLayer+".qcow2"), expected) {
		t.Error("the server's head does not read as the laptop's chain")
	}
	run(bin, srv, "store", "check")
	run(bin, lap, "store", "check")
	checkQcow2Under(t, srv)
	checkQcow2Under(t, lap)
}
