package main

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"libvirt.org/go/libvirtxml"

	"github.com/cvd-project/cvd/hypervisor"
	"github.com/cvd-project/cvd/images"
	"github.com/cvd-project/cvd/internal/testutil"
	"github.com/cvd-project/cvd/vm"
)

// Offsets the tiny guest writes at (guest/init, set on its kernel command line).
const (
	vmDiskSize   = 32 << 20
	vmPatternOff = 1 << 20
	vmPatternLen = 4096
	vmHostOff    = 2 << 20
	vmLoopOff    = 8 << 20
	vmLoopStride = 64 << 10 // one block per cluster: no copy-on-write mixes blocks
	vmLoopLen    = 4096
	vmBaseByte   = 0x11 // the base holds this byte in its first 64 KiB
)

// vmEnv is what the vm tests share: one libvirtd and the tiny guest.
type vmEnv struct {
	uri                     string
	kernel, initrd, cmdline string
}

// setupVMEnv finds a libvirtd (CVD_TEST_LIBVIRT_URI, else the system one when it
// answers, else a private one started with scripts/libvirtd.sh and stopped, by
// its PID, when t ends) and builds the tiny guest (scripts/build-guest.sh, a no-op
// when it is up to date).
func setupVMEnv(t *testing.T) *vmEnv {
	t.Helper()
	if testing.Short() {
		t.Skip("-short: no libvirtd")
	}
	testutil.NeedQemu(t)
	testutil.NeedTool(t, "libvirt", "libvirtd", "virsh", "qemu-system-x86_64")
	skip := func(format string, args ...any) {
		t.Helper()
		if testutil.Required("libvirt") {
			t.Fatalf("libvirt required (CVD_TEST_REQUIRE) but: "+format, args...)
		}
		t.Skipf(format, args...)
	}
	root, err := filepath.Abs(filepath.Join("..", ".."))
	if err != nil {
		t.Fatal(err)
	}
	env := &vmEnv{uri: os.Getenv("CVD_TEST_LIBVIRT_URI")}
	if env.uri == "" {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		if c, err := hypervisor.Connect(ctx, hypervisor.DefaultURI); err == nil {
			c.Close()
			env.uri = hypervisor.DefaultURI
		}
		cancel()
	}
	if env.uri == "" {
		if os.Geteuid() != 0 {
			skip("no libvirtd reachable and not root: cannot start a private one")
		}
		uri, err := startPrivateLibvirtd(t, root)
		if err != nil {
			skip("%v", err)
		}
		env.uri = uri
	}

	guest := os.Getenv("CVD_GUEST_DIR")
	if guest == "" {
		guest = filepath.Join(root, ".cache", "guest")
	}
	c := exec.Command(filepath.Join(root, "scripts", "build-guest.sh"))
	c.Env = append(os.Environ(), "CVD_GUEST_DIR="+guest)
	if out, err := c.CombinedOutput(); err != nil {
		skip("no tiny guest: scripts/build-guest.sh: %v\n%s", err, out)
	}
	cmdline, err := os.ReadFile(filepath.Join(guest, "cmdline"))
	if err != nil {
		skip("no tiny guest: %v", err)
	}
	env.kernel, env.initrd = filepath.Join(guest, "kernel"), filepath.Join(guest, "initramfs.cpio.gz")
	env.cmdline = strings.TrimSpace(string(cmdline)) + fmt.Sprintf(" cvd.pattern_off=%d cvd.pattern_len=%d cvd.host_off=%d cvd.loop_off=%d cvd.loop_stride=%d cvd.loop_len=%d",
		vmPatternOff, vmPatternLen, vmHostOff, vmLoopOff, vmLoopStride, vmLoopLen)
	return env
}

// startPrivateLibvirtd starts a libvirtd of its own for the test
// (scripts/libvirtd.sh), stopped when t ends, and returns its URI.
func startPrivateLibvirtd(t *testing.T, root string) (string, error) {
	dir, err := os.MkdirTemp("", "cvd-vm-libvirtd-")
	if err != nil {
		return "", err
	}
	script := filepath.Join(root, "scripts", "libvirtd.sh")
	out, err := exec.Command(script, "start", dir).Output()
	if err != nil {
		os.RemoveAll(dir)
		return "", fmt.Errorf("start a private libvirtd: %v", err)
	}
	t.Cleanup(func() {
		if out, err := exec.Command(script, "stop", dir).CombinedOutput(); err != nil {
			t.Errorf("stop the private libvirtd in %s: %v\n%s", dir, err, out)
			return
		}
		os.RemoveAll(dir)
	})
	return "qemu:///system?socket=" + strings.TrimSpace(string(out)), nil
}

// vmStore is a store with a base layer (vmDiskSize bytes, vmBaseByte in its first
// 64 KiB) and a desktop "desk" on it. Every qcow2 file in it is checked with
// qemu-img when the test ends.
type vmStore struct {
	t     *testing.T
	env   *vmEnv
	dir   string
	base  string // the base layer's ID
	bfile string // its file
}

func newVMStore(t *testing.T, env *vmEnv) *vmStore {
	t.Helper()
	dir := t.TempDir()
	s := &vmStore{t: t, env: env, dir: filepath.Join(dir, "store")}
	storeImages(t, s.dir)
	src := filepath.Join(dir, "base.qcow2")
	testutil.Run(t, "qemu-img", "create", "-q", "-f", "qcow2", src, strconv.Itoa(vmDiskSize))
	testutil.Run(t, "qemu-io", "-c", fmt.Sprintf("write -P %#x 0 64k", vmBaseByte), src)
	s.base = strings.TrimSpace(s.must("layer", "import", src, "--kind", "base", "--name", "tiny:1"))
	s.bfile = filepath.Join(s.dir, "layers", s.base+".qcow2")
	s.must("desktop", "create", "desk", "--base", "tiny:1")
	return s
}

// cvd runs the command line in-process against the store and returns stdout and
// the error (whose exit code exitCode gives).
func (s *vmStore) cvd(args ...string) (string, error) {
	s.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	root := newRootCommand()
	var out, errb bytes.Buffer
	root.SetOut(&out)
	root.SetErr(&errb)
	root.SetArgs(append([]string{"--store", s.dir}, args...))
	err := root.ExecuteContext(ctx)
	if errb.Len() > 0 {
		s.t.Logf("cvd %s: stderr: %s", strings.Join(args, " "), errb.String())
	}
	return out.String(), err
}

func (s *vmStore) must(args ...string) string {
	s.t.Helper()
	out, err := s.cvd(args...)
	if err != nil {
		s.t.Fatalf("cvd %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return out
}

// mustJSON runs a command with --json and decodes its output into v.
func (s *vmStore) mustJSON(v any, args ...string) {
	s.t.Helper()
	out := s.must(append([]string{"--json"}, args...)...)
	if err := json.Unmarshal([]byte(out), v); err != nil {
		s.t.Fatalf("cvd %s: %v\n%s", strings.Join(args, " "), err, out)
	}
}

// fails runs a command that must fail with exit code code and a message
// matching re.
func (s *vmStore) fails(code int, re string, args ...string) {
	s.t.Helper()
	out, err := s.cvd(args...)
	if err == nil {
		s.t.Fatalf("cvd %s succeeded:\n%s", strings.Join(args, " "), out)
	}
	if got := exitCode(err); got != code {
		s.t.Errorf("cvd %s: exit %d, want %d (%v)", strings.Join(args, " "), got, code, err)
	}
	if !regexp.MustCompile(re).MatchString(err.Error()) {
		s.t.Errorf("cvd %s: error %q does not match %q", strings.Join(args, " "), err, re)
	}
}

// provision provisions count clones booting the tiny guest with extra kernel
// arguments.
func (s *vmStore) provision(name string, count int, extra string) provisionReport {
	s.t.Helper()
	var rep provisionReport
	s.mustJSON(&rep, "provision", "desk", "--count", strconv.Itoa(count), "--name", name, "--connect", s.env.uri,
		"--memory", "128", "--kernel", s.env.kernel, "--initrd", s.env.initrd, "--append", s.env.cmdline+" "+extra)
	s.t.Cleanup(func() {
		// Whatever a failed test left: destroyed and undefined (the store goes with
		// the temporary directory).
		for _, c := range rep.Clones {
			s.cvd("vm", "rm", "--force", "--connect", s.env.uri, c.Name)
		}
	})
	return rep
}

func (s *vmStore) clone(name string) images.Clone {
	s.t.Helper()
	var c images.Clone
	s.mustJSON(&c, "clone", "show", name)
	return c
}

func (s *vmStore) serialLog(name string) string {
	b, _ := os.ReadFile(filepath.Join(s.dir, vm.LogsDir, name+".serial.log"))
	return string(b)
}

// waitLog waits until a clone's serial log matches re.
func (s *vmStore) waitLog(name string, re *regexp.Regexp, timeout time.Duration) string {
	s.t.Helper()
	end := time.Now().Add(timeout)
	for {
		l := s.serialLog(name)
		if re.MatchString(l) {
			return l
		}
		if time.Now().After(end) {
			s.t.Fatalf("serial log of %s never matched %s:\n%s", name, re, l)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func fileSHA256(t *testing.T, path string) string {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(h.Sum(nil))
}

// topBytes is what one layer alone holds, read by QEMU with no backing file:
// its clusters, zeros elsewhere.
func topBytes(t *testing.T, path string) []byte {
	t.Helper()
	out := filepath.Join(t.TempDir(), "layer.raw")
	spec := fmt.Sprintf(`json:{"driver":"qcow2","backing":null,"file":{"driver":"file","filename":%q}}`, path)
	testutil.Run(t, "qemu-img", "convert", "-U", "-O", "raw", spec, out)
	b, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// sameBytes fails the test at the first difference.
func sameBytes(t *testing.T, what string, got, want []byte) {
	t.Helper()
	if len(got) != len(want) {
		t.Fatalf("%s: %d bytes, want %d", what, len(got), len(want))
	}
	for i := range got {
		if got[i] != want[i] {
			t.Fatalf("%s: first difference at %#x: %#x, want %#x", what, i, got[i], want[i])
		}
	}
}

// guestWrites is what the tiny guest writes before any loop: its pattern block
// and its NUL-padded hostname.
func guestWrites(b []byte, pattern byte, hostname string) {
	copy(b[vmPatternOff:], bytes.Repeat([]byte{pattern}, vmPatternLen))
	copy(b[vmHostOff:], hostname)
}

// TestVM runs cvd provision and cvd vm end to end with a real libvirtd and the
// tiny guest. The subtests share the libvirtd and run in parallel; each has its
// own store.
func TestVM(t *testing.T) {
	env := setupVMEnv(t)
	t.Run("provision", func(t *testing.T) { t.Parallel(); testVMProvision(t, env) })
	t.Run("stop", func(t *testing.T) { t.Parallel(); testVMStop(t, env) })
	t.Run("checkpoint", func(t *testing.T) { t.Parallel(); testVMCheckpoint(t, env) })
	t.Run("errors", func(t *testing.T) { t.Parallel(); testVMErrors(t, env) })
	t.Run("define", func(t *testing.T) { t.Parallel(); testVMDefine(t, env) })
	t.Run("host", func(t *testing.T) { t.Parallel(); testVMHostPull(t, env) })
}

// A hypervisor host with its own store provisions 20 clones of a desktop whose
// layers it did not hold, pulling each layer once from `cvd serve` with a host
// token; every clone checks clean and reads like the server's chain. A second
// provision moves no layer bytes.
func testVMHostPull(t *testing.T, env *vmEnv) {
	srv := newVMStore(t, env)
	app := filepath.Join(t.TempDir(), "app.qcow2")
	testutil.Run(t, "qemu-img", "create", "-q", "-f", "qcow2", "-b", srv.bfile, "-F", "qcow2", app)
	testutil.Run(t, "qemu-io", "-c", "write -P 0x5c 4M 2M", app)
	srv.must("layer", "import", app, "--kind", "app", "--parent", "tiny:1", "--name", "tool:1")
	srv.must("desktop", "create", "office", "--base", "tiny:1", "--app", "tool:1")
	var added struct {
		Token string `json:"token"`
	}
	srv.mustJSON(&added, "device", "add", "hv1", "--host")
	var head struct {
		Head     int `json:"head"`
		Versions []struct {
			N      int    `json:"n"`
			System string `json:"system"`
		} `json:"versions"`
	}
	srv.mustJSON(&head, "desktop", "versions", "office")
	var want string
	for _, v := range head.Versions {
		if v.N == head.Head {
			want = v.System
		}
	}
	serve := startServe(t, buildCvd(t), srv.dir)

	host := &vmStore{t: t, env: env, dir: filepath.Join(t.TempDir(), "host")}
	storeImages(t, host.dir)
	provision := func(name string) provisionReport {
		t.Helper()
		var rep provisionReport
		host.mustJSON(&rep, "provision", "office", "--count", "20", "--name", name, "--no-start", "--connect", env.uri,
			"--memory", "64", "--kernel", env.kernel, "--initrd", env.initrd, "--server", serve.url, "--token", added.Token)
		t.Cleanup(func() {
			for _, c := range rep.Clones {
				host.cvd("vm", "rm", "--force", "--connect", env.uri, c.Name)
			}
		})
		return rep
	}
	rep := provision("hostpull")
	if rep.Pull == nil || len(rep.Pull.LayersFetched) != 2 || rep.Pull.Bytes == 0 || rep.Failed != 0 || len(rep.Clones) != 20 {
		t.Fatalf("first provision: pull %+v, %d clones, %d failed", rep.Pull, len(rep.Clones), rep.Failed)
	}
	t.Logf("first provision: pulled %d layers, %d bytes, in %.2fs; 20 clones defined in %.2fs",
		len(rep.Pull.LayersFetched), rep.Pull.Bytes, rep.Pull.Took, rep.Timing.Total)
	for _, c := range rep.Clones {
		testutil.QemuCheck(t, c.Disk)
		testutil.QemuCompare(t, filepath.Join(srv.dir, "layers", want+".qcow2"), c.Disk)
	}
	again := provision("hostpull2")
	if again.Pull == nil || len(again.Pull.LayersFetched) != 0 || again.Pull.Bytes != 0 || len(again.Pull.LayersHeld) != 2 {
		t.Fatalf("second provision moved layers: %+v", again.Pull)
	}
	// The host token reads layers and takes no lease.
	lap := t.TempDir()
	cmd := cvdProc(buildCvd(t), lap, "checkout", "office", "--server", serve.url, "--token", added.Token)
	if out, err := cmd.CombinedOutput(); err == nil || !strings.Contains(string(out), "takes no lease") && !strings.Contains(string(out), "take no lease") {
		t.Errorf("check-out with a host token: %v\n%s", err, out)
	}
}

// vm start records boot settings in the clone's catalog entry and reuses them;
// --disk-boot goes back to booting from the disk; --define-only starts nothing.
func testVMDefine(t *testing.T, env *vmEnv) {
	s := newVMStore(t, env)
	s.must("clone", "desk", "--name", "dz")
	defined := func(wantKernel bool, wantMem string) {
		t.Helper()
		x := testutil.Run(t, "virsh", "-c", env.uri, "dumpxml", "--inactive", "dz")
		var d libvirtxml.Domain
		if err := d.Unmarshal(x); err != nil {
			t.Fatal(err)
		}
		if (d.OS.Kernel != "") != wantKernel || (!wantKernel && (len(d.OS.BootDevices) != 1 || d.OS.BootDevices[0].Dev != "hd")) {
			t.Errorf("kernel %q, boot %+v; want kernel: %v", d.OS.Kernel, d.OS.BootDevices, wantKernel)
		}
		if got := fmt.Sprintf("%d %s", d.Memory.Value, d.Memory.Unit); got != wantMem {
			t.Errorf("memory %s, want %s", got, wantMem)
		}
	}
	var r vmStartResult
	s.mustJSON(&r, "vm", "start", "dz", "--define-only", "--connect", env.uri, "--kernel", env.kernel, "--initrd", env.initrd,
		"--append", "console=ttyS0 cvd.hold=5", "--memory", "96")
	t.Cleanup(func() { s.cvd("vm", "rm", "--force", "dz", "--connect", env.uri) })
	if r.State != "shut off" || r.Kernel == "" || len(r.Disks) != 1 || len(r.Disks[0].Chain) != 2 || r.Seed == "" {
		t.Errorf("vm start --define-only: %+v", r)
	}
	defined(true, "98304 KiB")
	if c := s.clone("dz"); c.Boot == nil || c.Boot.Cmdline != "console=ttyS0 cvd.hold=5" || c.Boot.MemoryMiB != 96 || c.Boot.Initrd != env.initrd {
		t.Errorf("boot recorded: %+v", c.Boot)
	}
	// No flags: the recorded boot again.
	s.must("vm", "start", "dz", "--define-only", "--connect", env.uri)
	defined(true, "98304 KiB")
	s.must("vm", "start", "dz", "--define-only", "--disk-boot", "--connect", env.uri)
	defined(false, "98304 KiB")
	if c := s.clone("dz"); c.Boot == nil || c.Boot.Kernel != "" || c.Boot.Cmdline != "" || c.Boot.MemoryMiB != 96 {
		t.Errorf("boot after --disk-boot: %+v", c.Boot)
	}
	s.fails(exitUsage, `exclude each other`, "vm", "start", "dz", "--disk-boot", "--kernel", env.kernel, "--connect", env.uri)
	s.fails(exitUsage, `boot file .*: not a readable file`, "vm", "start", "dz", "--kernel", "/nonexistent/vmlinux", "--connect", env.uri)
	var st vmStatus
	s.mustJSON(&st, "vm", "status", "dz", "--connect", env.uri)
	if st.Running || st.State != "shut off" || st.Clone != "dz" {
		t.Errorf("status after --define-only: %+v", st)
	}
	s.must("vm", "rm", "--clone", "dz", "--connect", env.uri)
	s.must("store", "check")
}

// Three clones of a desktop: each boots, writes its pattern and its own hostname
// (from its seed) into its own top and powers off; nothing else changes; the
// base's digest stays; every layer checks clean; the domain XML declares the
// chain with formats; vm ls, status and rm see them.
func testVMProvision(t *testing.T, env *vmEnv) {
	s := newVMStore(t, env)
	baseSum := fileSHA256(t, s.bfile)
	deskTop := filepath.Join(s.dir, "desktops", "desk.system.qcow2")
	deskSum := fileSHA256(t, deskTop)
	rep := s.provision("pv", 3, "cvd.pattern=0xa7")
	if len(rep.Clones) != 3 || rep.Failed != 0 || !rep.Started {
		t.Fatalf("provision report %+v", rep)
	}
	if rep.Timing.Total <= 0 || rep.Timing.ClonesPerSec <= 0 || rep.Timing.Clone <= 0 || rep.Timing.Start <= 0 {
		t.Errorf("timing %+v", rep.Timing)
	}
	t.Logf("provision 3: %.2fs to all running (%.1f clones/s): %+v", rep.Timing.Total, rep.Timing.ClonesPerSec, rep.Timing)
	names := []string{"pv-1", "pv-2", "pv-3"}
	for i, c := range rep.Clones {
		if c.Name != names[i] || c.State != "running" || c.RunningAt <= 0 || c.RunningAt > rep.Timing.Total {
			t.Errorf("clone %d: %+v", i, c)
		}
	}

	// The persistent definition declares the whole chain with formats, the seed,
	// the identity and cvd's metadata (virsh reads it, not cvd).
	for _, n := range names {
		c := s.clone(n)
		x := testutil.Run(t, "virsh", "-c", env.uri, "dumpxml", "--inactive", n)
		var d libvirtxml.Domain
		if err := d.Unmarshal(x); err != nil {
			t.Fatal(err)
		}
		if d.UUID != c.UUID || len(d.Devices.Interfaces) != 1 || d.Devices.Interfaces[0].MAC.Address != c.MAC {
			t.Errorf("%s: uuid %s, interfaces %+v; want %s, %s", n, d.UUID, d.Devices.Interfaces, c.UUID, c.MAC)
		}
		if !strings.Contains(x, `clone="`+n+`"`) || !strings.Contains(x, `desktop="desk"`) || !strings.Contains(x, hypervisor.MetadataNS) {
			t.Errorf("%s: no cvd metadata:\n%s", n, x)
		}
		if len(d.Devices.Disks) != 2 {
			t.Fatalf("%s: %d disks:\n%s", n, len(d.Devices.Disks), x)
		}
		vda, seed := d.Devices.Disks[0], d.Devices.Disks[1]
		if vda.Target.Dev != "vda" || vda.Driver.Type != "qcow2" || vda.Source.File.File != filepath.Join(s.dir, c.Disk) {
			t.Errorf("%s: vda %+v", n, vda)
		}
		bs := vda.BackingStore
		if bs == nil || bs.Format == nil || bs.Format.Type != "qcow2" || bs.Source == nil || bs.Source.File.File != s.bfile ||
			bs.BackingStore == nil || (bs.BackingStore.Source != nil && bs.BackingStore.Source.File != nil) {
			t.Errorf("%s: backing chain not declared as top → %s (qcow2) → end:\n%s", n, s.bfile, x)
		}
		if seed.Target.Dev != "vdb" || seed.ReadOnly == nil || seed.Driver.Type != "raw" || seed.Source.File.File != filepath.Join(s.dir, c.Seed) {
			t.Errorf("%s: seed disk %+v", n, seed)
		}
	}

	var ls []vmStatus
	s.mustJSON(&ls, "vm", "ls", "--connect", env.uri)
	got := map[string]vmStatus{}
	for _, l := range ls {
		got[l.Name] = l
	}
	for _, n := range names {
		if l, ok := got[n]; !ok || l.Clone != n || l.Desktop != "desk" || !l.Managed {
			t.Errorf("vm ls: %s is %+v", n, l)
		}
	}

	var ends []vmStatus
	s.mustJSON(&ends, append([]string{"vm", "wait", "--connect", env.uri, "--timeout", "2m"}, names...)...)
	for _, e := range ends {
		if e.State != "shut off" || e.Reason != "shutdown" {
			t.Errorf("%s ended %s (%s), want shut off (shutdown): %s", e.Name, e.State, e.Reason, s.serialLog(e.Name))
		}
	}
	var st vmStatus
	s.mustJSON(&st, "vm", "status", "pv-2", "--connect", env.uri)
	if st.State != "shut off" || st.Reason != "shutdown" || st.Clone != "pv-2" || st.Desktop != "desk" || len(st.Disks) != 2 || len(st.Disks[0].Chain) != 2 {
		t.Errorf("vm status pv-2: %+v", st)
	}

	// Each top holds exactly its pattern and its own hostname.
	for _, n := range names {
		c := s.clone(n)
		if c.Hostname != n {
			t.Errorf("clone %s has hostname %q", n, c.Hostname)
		}
		if l := s.serialLog(n); !strings.Contains(l, "cvd-guest: hostname "+c.Hostname+"\n") && !strings.Contains(l, "cvd-guest: hostname "+c.Hostname+"\r") {
			t.Errorf("%s: the guest did not report hostname %s:\n%s", n, c.Hostname, l)
		}
		want := make([]byte, vmDiskSize)
		guestWrites(want, 0xa7, c.Hostname)
		sameBytes(t, n+"'s top", topBytes(t, filepath.Join(s.dir, c.Disk)), want)
		// And through the whole chain, as QEMU reads it: the base shows below.
		testutil.Run(t, "qemu-io", "-r", "-c", fmt.Sprintf("read -P %#x 0 64k", vmBaseByte), "-c", "read -P 0xa7 1M 4k",
			"-c", fmt.Sprintf("read -P 0 %d 1M", 4<<20), filepath.Join(s.dir, c.Disk))
	}

	// The base did not change: same file, same content ID, and it checks clean.
	if sum := fileSHA256(t, s.bfile); sum != baseSum {
		t.Errorf("base layer file changed: sha256 %s, was %s", sum, baseSum)
	}
	if sum := fileSHA256(t, deskTop); sum != deskSum {
		t.Errorf("the desktop's own top changed")
	}
	s.must("layer", "verify")
	testutil.QemuCheck(t, s.bfile)
	s.must("store", "check", "--deep")

	// rm: a shut-off domain is undefined and its files stay; --clone removes the
	// clone too; the layer is never touched.
	s.must("vm", "rm", "pv-1", "--connect", env.uri)
	s.fails(exitFailure, `no domain named "pv-1"`, "vm", "status", "pv-1", "--connect", env.uri)
	if _, err := os.Stat(filepath.Join(s.dir, s.clone("pv-1").Disk)); err != nil {
		t.Errorf("vm rm removed the clone's top: %v", err)
	}
	s.must("vm", "rm", "--clone", "pv-1", "pv-2", "pv-3", "--connect", env.uri)
	if out := s.must("clone", "ls"); strings.Contains(out, "pv-") {
		t.Errorf("clones left after vm rm --clone:\n%s", out)
	}
	if sum := fileSHA256(t, s.bfile); sum != baseSum {
		t.Errorf("base layer file changed by rm")
	}
	s.must("store", "check")
}

// A guest that ignores the ACPI request is destroyed after the timeout, with a
// message that says so; one that honours it shuts down; a running domain is not
// removed without --force.
func testVMStop(t *testing.T, env *vmEnv) {
	s := newVMStore(t, env)
	s.provision("deaf", 1, "cvd.hold=-1")
	s.provision("polite", 1, "cvd.hold=-1 cvd.acpi=1")
	s.waitLog("deaf", regexp.MustCompile(`holding forever`), 2*time.Minute)
	s.waitLog("polite", regexp.MustCompile(`holding forever`), 2*time.Minute)

	s.fails(exitFailure, `domain "deaf" is running.*stop it first.*--force`, "vm", "rm", "deaf", "--connect", env.uri)
	s.fails(exitFailure, `already running`, "vm", "start", "deaf", "--connect", env.uri)

	var wg sync.WaitGroup
	var deaf, polite vmStopResult
	var deafErr, politeErr error
	wg.Add(2)
	go func() {
		defer wg.Done()
		out, err := s.cvd("--json", "vm", "stop", "deaf", "--timeout", "2s", "--connect", env.uri)
		if deafErr = err; err == nil {
			deafErr = json.Unmarshal([]byte(out), &deaf)
		}
	}()
	go func() {
		defer wg.Done()
		out, err := s.cvd("--json", "vm", "stop", "polite", "--timeout", "90s", "--connect", env.uri)
		if politeErr = err; err == nil {
			politeErr = json.Unmarshal([]byte(out), &polite)
		}
	}()
	wg.Wait()
	if deafErr != nil || politeErr != nil {
		t.Fatalf("vm stop: %v, %v", deafErr, politeErr)
	}
	if !deaf.Forced || deaf.Reason != "destroyed" || deaf.Seconds < 2 ||
		!strings.Contains(deaf.Message, `"deaf" did not shut down within 2s`) || !strings.Contains(deaf.Message, "destroyed it (forced off)") {
		t.Errorf("stop of a guest that ignores ACPI: %+v", deaf)
	}
	if polite.Forced || polite.Reason != "shutdown" || !strings.Contains(polite.Message, "shut down after") {
		t.Errorf("stop of a guest that honours ACPI: %+v", polite)
	}
	if l := s.serialLog("polite"); !strings.Contains(l, "acpi power button, powering off") {
		t.Errorf("polite guest's log:\n%s", l)
	}
	// The plain output says the same, and a second stop is not an error.
	if out := s.must("vm", "stop", "deaf", "--connect", env.uri); !strings.Contains(out, "already shut off") {
		t.Errorf("second stop: %q", out)
	}
	s.must("vm", "rm", "--clone", "deaf", "polite", "--connect", env.uri)
	s.must("store", "check")
}

// A live checkpoint while the guest writes numbered blocks: the frozen top and
// the new one check clean, the frozen top holds what was written before the
// checkpoint and the new one what came after, the guest completes and powers off
// normally, the catalog records the new top and the frozen one, and the next
// start declares the new chain.
func testVMCheckpoint(t *testing.T, env *vmEnv) {
	s := newVMStore(t, env)
	s.provision("cp", 1, "cvd.pattern=0xc3 cvd.loop=6 cvd.loop_ms=100")
	s.waitLog("cp", regexp.MustCompile(`block 3 written`), 2*time.Minute)
	blockRE := regexp.MustCompile(`cvd-guest: block (\d+) written`)
	before := len(blockRE.FindAllString(s.serialLog("cp"), -1))

	var cp vmCheckpointResult
	s.mustJSON(&cp, "vm", "checkpoint", "cp", "--connect", env.uri)
	frozen, top := filepath.Join(s.dir, "clones", "cp.qcow2"), filepath.Join(s.dir, "clones", "cp.cp1.qcow2")
	if len(cp.Disks) != 1 || cp.Disks[0].Target != "vda" || cp.Disks[0].Frozen != frozen || cp.Disks[0].Top != top || cp.Disks[0].N != 1 {
		t.Fatalf("checkpoint result %+v", cp)
	}
	after := len(blockRE.FindAllString(s.serialLog("cp"), -1))

	var ends []vmStatus
	s.mustJSON(&ends, "vm", "wait", "cp", "--connect", env.uri, "--timeout", "2m")
	log := s.serialLog("cp")
	m := regexp.MustCompile(`cvd-guest: loop done (\d+) blocks`).FindStringSubmatch(log)
	if len(ends) != 1 || ends[0].Reason != "shutdown" || m == nil || !strings.Contains(log, "cvd-guest: poweroff") || strings.Contains(log, "cvd-guest: error") {
		t.Fatalf("the guest did not finish normally: %+v\n%s", ends, log)
	}
	n, _ := strconv.Atoi(m[1])
	if n <= after || before < 4 {
		t.Fatalf("%d blocks in all, %d before the checkpoint, %d when it returned: no writes on both sides", n, before, after)
	}

	testutil.QemuCheck(t, frozen)
	testutil.QemuCheck(t, top)
	if fi, err := os.Stat(frozen); err != nil || fi.Mode().Perm() != 0o444 {
		t.Errorf("frozen top: %v, mode %v; want read-only", err, fi.Mode())
	}
	fb, tb := topBytes(t, frozen), topBytes(t, top)
	// The frozen top holds the pattern, the hostname and blocks 0..k-1; the new
	// top blocks k..n-1; k is at least what the guest had logged before the
	// checkpoint started and at most what it had logged when it returned.
	k := 0
	for ; k < n; k++ {
		if fb[vmLoopOff+k*vmLoopStride] == 0 {
			break
		}
	}
	if k < before || k > after+1 {
		t.Errorf("frozen top holds blocks 0..%d; %d were written before the checkpoint, %d when it returned", k-1, before, after)
	}
	wantF, wantT := make([]byte, vmDiskSize), make([]byte, vmDiskSize)
	guestWrites(wantF, 0xc3, "cp")
	for i := 0; i < n; i++ {
		w := wantF
		if i >= k {
			w = wantT
		}
		copy(w[vmLoopOff+i*vmLoopStride:], bytes.Repeat([]byte{byte(i%255 + 1)}, vmLoopLen))
	}
	sameBytes(t, "frozen top", fb, wantF)
	sameBytes(t, "new top", tb, wantT)

	// The catalog follows; the next start declares top → frozen → base, and the
	// new top's backing name is made relative again.
	c := s.clone("cp")
	if c.Disk != "clones/cp.cp1.qcow2" || len(c.Checkpoints) != 1 || c.Checkpoints[0] != "clones/cp.qcow2" {
		t.Fatalf("catalog after the checkpoint: disk %s, checkpoints %v", c.Disk, c.Checkpoints)
	}
	var started vmStartResult
	s.mustJSON(&started, "vm", "start", "cp", "--define-only", "--connect", env.uri)
	var d libvirtxml.Domain
	if err := d.Unmarshal(testutil.Run(t, "virsh", "-c", env.uri, "dumpxml", "--inactive", "cp")); err != nil {
		t.Fatal(err)
	}
	var chain []string
	vda := d.Devices.Disks[0]
	chain = append(chain, vda.Driver.Type+":"+vda.Source.File.File)
	for bs := vda.BackingStore; bs != nil && bs.Source != nil && bs.Source.File != nil; bs = bs.BackingStore {
		chain = append(chain, bs.Format.Type+":"+bs.Source.File.File)
	}
	if want := []string{"qcow2:" + top, "qcow2:" + frozen, "qcow2:" + s.bfile}; strings.Join(chain, " ") != strings.Join(want, " ") {
		t.Errorf("chain after the checkpoint:\n got %v\nwant %v", chain, want)
	}
	if info := testutil.Run(t, "qemu-img", "info", "-U", top); !strings.Contains(info, "backing file: cp.qcow2 ") {
		t.Errorf("new top's backing name is not relative:\n%s", info)
	}
	// Through the whole chain the guest's view is complete.
	testutil.Run(t, "qemu-io", "-r", "-c", "read -P 0xc3 1M 4k", "-c", fmt.Sprintf("read -P 1 %d 4k", vmLoopOff),
		"-c", fmt.Sprintf("read -P %d %d 4k", n, vmLoopOff+(n-1)*vmLoopStride), "-c", fmt.Sprintf("read -P %#x 0 64k", vmBaseByte), top)
	s.must("store", "check", "--deep")
	s.fails(exitFailure, `is shut off.*needs a running guest`, "vm", "checkpoint", "cp", "--connect", env.uri)

	s.must("vm", "rm", "--clone", "cp", "--connect", env.uri)
	for _, f := range []string{frozen, top} {
		if _, err := os.Stat(f); !os.IsNotExist(err) {
			t.Errorf("%s left after vm rm --clone: %v", f, err)
		}
	}
	s.must("store", "check")
}

// Clear errors and exit codes: a missing domain or clone, a bad URI, a libvirtd
// that is not there; a domain that is not cvd's is never removed; provision
// makes no clone when libvirtd is down.
func testVMErrors(t *testing.T, env *vmEnv) {
	s := newVMStore(t, env)
	for _, tt := range []struct {
		name string
		code int
		re   string
		args []string
	}{
		{"missing domain", exitFailure, `no domain named "nosuch" on .*cvd vm ls`, []string{"vm", "status", "nosuch", "--connect", env.uri}},
		{"missing domain stop", exitFailure, `no domain named "nosuch"`, []string{"vm", "stop", "nosuch", "--connect", env.uri}},
		{"missing domain rm", exitFailure, `no domain named "nosuch"`, []string{"vm", "rm", "nosuch", "--connect", env.uri}},
		{"missing clone", exitFailure, `clone nosuch: not found.*cvd clone ls`, []string{"vm", "start", "nosuch", "--connect", env.uri}},
		{"missing desktop", exitFailure, `desktop nosuch: not found`, []string{"provision", "nosuch", "--count", "2", "--connect", env.uri}},
		{"other driver", exitUsage, `--connect: .*driver "xen" not supported`, []string{"vm", "status", "x", "--connect", "xen:///system"}},
		{"remote", exitUsage, `--connect: .*transport "ssh" not supported`, []string{"vm", "ls", "--connect", "qemu+ssh://host/system"}},
		{"session", exitUsage, `--connect: .*"/session" not supported`, []string{"vm", "ls", "--connect", "qemu:///session"}},
		{"no socket", exitFailure, `libvirtd unavailable.*/nonexistent/sock`, []string{"vm", "status", "x", "--connect", "qemu:///system?socket=/nonexistent/sock"}},
		{"not cvd's", exitFailure, `domain "test" is not cvd's`, []string{"vm", "rm", "--force", "test", "--connect", testDriverURI(env.uri)}},
		{"bad timeout", exitUsage, `--timeout must be positive`, []string{"vm", "stop", "x", "--timeout", "0s", "--connect", env.uri}},
		{"initrd without kernel", exitUsage, `need --kernel`, []string{"provision", "desk", "--initrd", env.initrd, "--connect", env.uri}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			s.t = t
			s.fails(tt.code, tt.re, tt.args...)
		})
	}
	s.t = t

	// A socket that nobody listens on: libvirtd stopped and left it behind.
	sock := filepath.Join(t.TempDir(), "libvirt-sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	l.(*net.UnixListener).SetUnlinkOnClose(false)
	l.Close()
	down := "qemu:///system?socket=" + sock
	t0 := time.Now()
	s.fails(exitFailure, `libvirtd unavailable`, "vm", "ls", "--connect", down)
	s.fails(exitFailure, `libvirtd unavailable`, "provision", "desk", "--count", "3", "--connect", down)
	if el := time.Since(t0); el > 20*time.Second {
		t.Errorf("errors for a stopped libvirtd took %v", el)
	}
	if out := s.must("clone", "ls"); strings.Count(out, "\n") != 1 {
		t.Errorf("provision made clones while libvirtd was down:\n%s", out)
	}
	// The test driver's own domain is still there: vm rm did not touch it.
	testutil.Run(t, "virsh", "-c", testDriverURI(env.uri), "dominfo", "test")
}

// testDriverURI is test:///default on the libvirtd uri names.
func testDriverURI(uri string) string {
	t, err := hypervisor.ParseURI(uri)
	if err != nil {
		return "test:///default"
	}
	return "test:///default?socket=" + t.Socket
}
