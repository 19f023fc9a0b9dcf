package hypervisor

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/cvd-project/cvd/disk"
	"github.com/cvd-project/cvd/internal/testutil"
	"libvirt.org/go/libvirtxml"
)

// Offsets the tiny guest writes at (guest/init, set on its kernel command line).
const (
	diskSize   = 32 << 20
	patternOff = 1 << 20
	patternLen = 4096
	hostOff    = 2 << 20
	loopOff    = 8 << 20
	loopStride = 64 << 10 // one block per qcow2 cluster: no copy-on-write mixes blocks
	loopLen    = 4096
	baseData   = 0x11 // the base holds this byte in its first 64 KiB
)

// guestRun is one tiny guest: its files and the spec that boots it.
type guestRun struct {
	dir, base, top, seed, log string
	name, hostname            string
	spec                      DomainSpec
}

// newGuest makes a top over base in dir, a seed with hostname, and a spec that
// boots the tiny guest with the extra kernel arguments.
func newGuest(t *testing.T, c *Conn, base, hostname, extra string) *guestRun {
	t.Helper()
	dir := t.TempDir()
	g := &guestRun{dir: dir, base: base, top: filepath.Join(dir, "top.qcow2"), log: filepath.Join(dir, "serial.log"),
		name: uniqueName(hostname), hostname: hostname}
	testutil.Run(t, "qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", g.top)
	g.seed = makeSeed(t, dir, hostname)
	cmdline, err := os.ReadFile(filepath.Join(guestDir, "cmdline"))
	if err != nil {
		t.Fatal(err)
	}
	kernel, err := filepath.EvalSymlinks(filepath.Join(guestDir, "kernel"))
	if err != nil {
		t.Fatal(err)
	}
	g.spec = DomainSpec{
		Name: g.name, UUID: randomUUID(), MAC: "52:54:00:00:00:01", MemoryMiB: 128, VCPUs: 1,
		Disks:   []DiskSpec{{Target: "vda", Chain: []disk.Info{{Path: g.top, Format: disk.FormatQcow2}, {Path: base, Format: disk.FormatQcow2}}}},
		SeedISO: g.seed, SerialLog: g.log,
		Kernel: kernel, Initrd: filepath.Join(guestDir, "initramfs.cpio.gz"),
		Cmdline: strings.TrimSpace(string(cmdline)) + fmt.Sprintf(" cvd.pattern_off=%d cvd.pattern_len=%d cvd.host_off=%d ",
			patternOff, patternLen, hostOff) + extra,
		Metadata: Metadata{Desktop: "test-desktop", Clone: hostname},
	}
	cleanupDomain(t, c, g.name)
	testutil.CheckOnCleanup(t, g.top)
	return g
}

// makeBase makes a qcow2 base whose first 64 KiB hold baseData.
func makeBase(t *testing.T) string {
	t.Helper()
	base := filepath.Join(t.TempDir(), "base.qcow2")
	testutil.Run(t, "qemu-img", "create", "-q", "-f", "qcow2", base, strconv.Itoa(diskSize))
	testutil.Run(t, "qemu-io", "-c", fmt.Sprintf("write -P %#x 0 64k", baseData), base)
	testutil.CheckOnCleanup(t, base)
	return base
}

// makeSeed writes a cloud-init NoCloud seed image (ISO9660, label cidata).
func makeSeed(t *testing.T, dir, hostname string) string {
	t.Helper()
	src := filepath.Join(dir, "seed")
	if err := os.MkdirAll(src, 0o755); err != nil {
		t.Fatal(err)
	}
	meta := fmt.Sprintf("instance-id: iid-%s\nlocal-hostname: %s\n", hostname, hostname)
	if err := os.WriteFile(filepath.Join(src, "meta-data"), []byte(meta), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(src, "user-data"), []byte("#cloud-config\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	iso := filepath.Join(dir, "seed.iso")
	testutil.Run(t, "genisoimage", "-quiet", "-V", "cidata", "-J", "-r", "-o", iso, src)
	return iso
}

func sha256File(t *testing.T, path string) string {
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

// layerBytes is what one layer alone holds, as the guest would see it with no
// backing file: its clusters, zeros elsewhere.
func layerBytes(t *testing.T, path string) []byte {
	t.Helper()
	out := filepath.Join(t.TempDir(), "layer.raw")
	spec := fmt.Sprintf(`json:{"driver":"qcow2","backing":null,"file":{"driver":"file","filename":%q}}`, path)
	testutil.Run(t, "qemu-img", "convert", "-O", "raw", spec, out)
	b, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// backingOf returns the backing file name and format recorded in a qcow2 image.
func backingOf(t *testing.T, path string) (string, string) {
	t.Helper()
	var info struct {
		Backing string `json:"backing-filename"`
		Format  string `json:"backing-filename-format"`
	}
	if err := json.Unmarshal([]byte(testutil.Run(t, "qemu-img", "info", "-U", "--output=json", path)), &info); err != nil {
		t.Fatal(err)
	}
	return info.Backing, info.Format
}

// waitLog waits until the serial log holds a line matching re, and returns the
// log.
func waitLog(ctx context.Context, t *testing.T, path string, re *regexp.Regexp) string {
	t.Helper()
	for {
		b, _ := os.ReadFile(path)
		if re.Match(b) {
			return string(b)
		}
		select {
		case <-ctx.Done():
			t.Fatalf("serial log %s never matched %s:\n%s", path, re, b)
		case <-time.After(50 * time.Millisecond):
		}
	}
}

func readLog(t *testing.T, path string) string {
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// expectTop checks that a top layer holds the guest's pattern block and
// hostname and nothing else.
func expectTop(t *testing.T, top string, pattern byte, hostname string) {
	t.Helper()
	b := layerBytes(t, top)
	want := make([]byte, len(b))
	copy(want[patternOff:], bytes.Repeat([]byte{pattern}, patternLen))
	copy(want[hostOff:], hostname)
	if !bytes.Equal(b, want) {
		for i := range b {
			if b[i] != want[i] {
				t.Fatalf("%s: first difference at %#x: %#x, want %#x (pattern %#x at %#x, hostname %q at %#x)",
					top, i, b[i], want[i], pattern, patternOff, hostname, hostOff)
			}
		}
		t.Fatalf("%s: %d bytes, want %d", top, len(b), len(want))
	}
}

// Three clones of one base boot at once; each writes its own hostname (read
// from its seed) and pattern into its own top and powers off; the base does
// not change and every layer checks clean; the domain XML declares the chain
// with formats.
func TestGuestClonesWriteTheirTops(t *testing.T) {
	c := needGuest(t)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	base := makeBase(t)
	baseSum := sha256File(t, base)

	var guests []*guestRun
	for i := range 3 {
		g := newGuest(t, c, base, fmt.Sprintf("clone-%d", i+1), fmt.Sprintf("cvd.pattern=%#x", 0xa1+i))
		g.spec.MAC = fmt.Sprintf("52:54:00:00:01:%02x", i+1)
		if err := c.Define(ctx, g.spec); err != nil {
			t.Fatal(err)
		}
		guests = append(guests, g)
	}

	var wg sync.WaitGroup
	results := make([]struct {
		boot, total time.Duration
		status      Status
		xml         string
		err         error
	}, len(guests))
	for i, g := range guests {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := &results[i]
			start := time.Now()
			if r.err = c.Start(ctx, g.name); r.err != nil {
				return
			}
			// The live XML while it runs: the chain as libvirt handed it to QEMU.
			r.xml, r.err = c.DumpXML(ctx, g.name)
			if r.err != nil {
				return
			}
			bootDone := make(chan time.Duration, 1)
			go func() {
				for ctx.Err() == nil {
					if b, _ := os.ReadFile(g.log); bytes.Contains(b, []byte("cvd-guest: init started")) {
						bootDone <- time.Since(start)
						return
					}
					time.Sleep(20 * time.Millisecond)
				}
				bootDone <- 0
			}()
			r.status, r.err = c.Wait(ctx, g.name)
			r.total = time.Since(start)
			r.boot = <-bootDone
		}()
	}
	wg.Wait()

	for i, g := range guests {
		r := results[i]
		if r.err != nil {
			t.Fatalf("%s: %v\nserial log:\n%s", g.name, r.err, readLog(t, g.log))
		}
		t.Logf("%s: start→/init %v, start→shut off %v (3 guests at once)", g.hostname, r.boot.Round(time.Millisecond), r.total.Round(time.Millisecond))
		if r.status.State != StateShutoff || r.status.Reason != "shutdown" {
			t.Errorf("%s: final status %v, want shut off (shutdown)", g.name, r.status)
		}
		log := readLog(t, g.log)
		for _, want := range []string{"cvd-guest: hostname " + g.hostname, "cvd-guest: poweroff"} {
			if !strings.Contains(log, want) {
				t.Errorf("%s: serial log lacks %q:\n%s", g.name, want, log)
			}
		}
		expectTop(t, g.top, byte(0xa1+i), g.hostname)
		// The chain as libvirt ran it: top over base, both with formats.
		var d libvirtxml.Domain
		if err := d.Unmarshal(r.xml); err != nil {
			t.Fatal(err)
		}
		vda := d.Devices.Disks[0]
		if vda.Source.File.File != g.top || vda.Driver.Type != "qcow2" || vda.BackingStore == nil ||
			vda.BackingStore.Format == nil || vda.BackingStore.Format.Type != "qcow2" ||
			vda.BackingStore.Source == nil || vda.BackingStore.Source.File.File != base {
			t.Errorf("%s: live XML does not declare top over base with formats:\n%s", g.name, r.xml)
		}
	}
	if sum := sha256File(t, base); sum != baseSum {
		t.Errorf("the base changed: sha256 %s, was %s", sum, baseSum)
	}
	for _, g := range guests {
		testutil.QemuCheck(t, g.top)
	}
	testutil.QemuCheck(t, base)

	// virsh sees the same declared chain in the persistent definition.
	out := testutil.Run(t, "virsh", "-c", testURI, "dumpxml", guests[0].name)
	if !regexp.MustCompile(`(?s)<backingStore type='file'[^>]*>\s*<format type='qcow2'/>\s*<source file='` + regexp.QuoteMeta(base) + `'`).MatchString(out) {
		t.Errorf("virsh dumpxml lacks the backing chain with formats:\n%s", out)
	}
	list, err := c.ListManaged(ctx)
	if err != nil {
		t.Fatal(err)
	}
	found := 0
	for _, d := range list {
		for _, g := range guests {
			if d.Name == g.name && d.Metadata.Clone == g.hostname && d.Metadata.Desktop == "test-desktop" {
				found++
			}
		}
	}
	if found != len(guests) {
		t.Errorf("ListManaged found %d of the %d clones: %+v", found, len(guests), list)
	}
}

// One guest on its own, for the timings of a single boot.
func TestGuestSingleBootTiming(t *testing.T) {
	c := needGuest(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	g := newGuest(t, c, makeBase(t), "solo", "cvd.pattern=0x5a")
	if err := c.Define(ctx, g.spec); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	if err := c.Start(ctx, g.name); err != nil {
		t.Fatal(err)
	}
	started := time.Since(start)
	waitLog(ctx, t, g.log, regexp.MustCompile(`cvd-guest: init started`))
	boot := time.Since(start)
	s, err := c.Wait(ctx, g.name)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("Start returned after %v; /init ran after %v; shut off after %v", started.Round(time.Millisecond),
		boot.Round(time.Millisecond), time.Since(start).Round(time.Millisecond))
	if s.Reason != "shutdown" {
		t.Errorf("status %v", s)
	}
	expectTop(t, g.top, 0x5a, "solo")
}

// A guest that ignores the ACPI request is destroyed after the timeout, and the
// result says so; one that honours it stops gracefully.
func TestGuestShutdown(t *testing.T) {
	c := needGuest(t)
	t.Parallel()
	base := makeBase(t)
	for _, tt := range []struct {
		name   string
		extra  string
		forced bool
		reason string
	}{
		{"ignores-acpi", "cvd.hold=-1", true, "destroyed"},
		{"honours-acpi", "cvd.hold=-1 cvd.acpi=1", false, "shutdown"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
			defer cancel()
			g := newGuest(t, c, base, tt.name, tt.extra)
			if err := c.Define(ctx, g.spec); err != nil {
				t.Fatal(err)
			}
			if err := c.Start(ctx, g.name); err != nil {
				t.Fatal(err)
			}
			waitLog(ctx, t, g.log, regexp.MustCompile(`cvd-guest: holding forever`))
			const timeout = 3 * time.Second
			r, err := c.Shutdown(ctx, g.name, timeout)
			if err != nil {
				t.Fatal(err)
			}
			t.Logf("%s: %s (%v)", tt.name, r.Message, r.Elapsed.Round(time.Millisecond))
			if r.Forced != tt.forced || r.Status.State != StateShutoff || r.Status.Reason != tt.reason {
				t.Errorf("result %+v, want forced=%v and shut off (%s)", r, tt.forced, tt.reason)
			}
			if tt.forced {
				if r.Elapsed < timeout || !strings.Contains(r.Message, "did not shut down within 3s") || !strings.Contains(r.Message, "destroyed") {
					t.Errorf("forced result: elapsed %v, message %q", r.Elapsed, r.Message)
				}
			} else {
				if r.Elapsed >= timeout {
					t.Errorf("graceful shutdown took %v", r.Elapsed)
				}
				if log := readLog(t, g.log); !strings.Contains(log, "acpi power button, powering off") {
					t.Errorf("guest log lacks its ACPI handler:\n%s", log)
				}
			}
		})
	}
}

var blockRE = regexp.MustCompile(`cvd-guest: block (\d+) written`)

// lastBlock is the highest block number the guest logged, or -1.
func lastBlock(log string) int {
	n := -1
	for _, m := range blockRE.FindAllStringSubmatch(log, -1) {
		if i, _ := strconv.Atoi(m[1]); i > n {
			n = i
		}
	}
	return n
}

// A live checkpoint while the guest writes numbered blocks: the frozen layer
// holds the blocks written before, the new top those after, both check clean,
// and the guest finishes and powers off on its own.
func TestGuestLiveCheckpoint(t *testing.T) {
	c := needGuest(t)
	t.Parallel()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	base := makeBase(t)
	baseSum := sha256File(t, base)
	g := newGuest(t, c, base, "writer", fmt.Sprintf("cvd.pattern=0x77 cvd.loop=6 cvd.loop_ms=100 cvd.loop_off=%d cvd.loop_stride=%d cvd.loop_len=%d",
		loopOff, loopStride, loopLen))
	if err := c.Define(ctx, g.spec); err != nil {
		t.Fatal(err)
	}
	if err := c.Start(ctx, g.name); err != nil {
		t.Fatal(err)
	}
	waitLog(ctx, t, g.log, regexp.MustCompile(`cvd-guest: block 3 written`))

	before := lastBlock(readLog(t, g.log)) // written (and synced) before the checkpoint
	newTop := filepath.Join(g.dir, "top-2.qcow2")
	testutil.CheckOnCleanup(t, newTop)
	start := time.Now()
	cp, err := c.Checkpoint(ctx, g.name, newTop)
	took := time.Since(start)
	if err != nil {
		t.Fatalf("%v\nserial log:\n%s", err, readLog(t, g.log))
	}
	after := lastBlock(readLog(t, g.log)) // at most this one and the next may be in the frozen layer
	t.Logf("checkpoint took %v; blocks 0..%d logged before it, 0..%d when it returned", took.Round(time.Millisecond), before, after)
	if cp.Target != "vda" || cp.Frozen != g.top || cp.Top != newTop {
		t.Errorf("checkpoint %+v, want vda frozen %s, top %s", cp, g.top, newTop)
	}
	// A second checkpoint to the same file is refused before libvirt sees it.
	if _, err := c.Checkpoint(ctx, g.name, newTop); !errors.Is(err, ErrExists) {
		t.Errorf("checkpoint onto an existing file: got %v, want ErrExists", err)
	}

	s, err := c.Wait(ctx, g.name)
	if err != nil {
		t.Fatal(err)
	}
	log := readLog(t, g.log)
	if s.Reason != "shutdown" || !strings.Contains(log, "cvd-guest: poweroff") || strings.Contains(log, "cvd-guest: error") {
		t.Fatalf("guest did not complete normally: %v\n%s", s, log)
	}
	m := regexp.MustCompile(`cvd-guest: loop done (\d+) blocks`).FindStringSubmatch(log)
	if m == nil {
		t.Fatalf("no loop done line:\n%s", log)
	}
	total, _ := strconv.Atoi(m[1])

	testutil.QemuCheck(t, g.top)
	testutil.QemuCheck(t, newTop)
	if b, f := backingOf(t, newTop); b != g.top || f != "qcow2" {
		t.Errorf("new top backs on %q (%s), want %s (qcow2)", b, f, g.top)
	}
	if b, f := backingOf(t, g.top); b != base || f != "qcow2" {
		t.Errorf("frozen layer backs on %q (%s), want %s (qcow2)", b, f, base)
	}
	if sum := sha256File(t, base); sum != baseSum {
		t.Errorf("the base changed")
	}

	// Each block is in exactly one layer: a prefix in the frozen one, the rest in
	// the new top.
	frozen, top := layerBytes(t, g.top), layerBytes(t, newTop)
	holds := func(b []byte, i int) bool {
		off := loopOff + i*loopStride
		blk := b[off : off+loopLen]
		want := bytes.Repeat([]byte{byte(i%255 + 1)}, loopLen)
		if bytes.Equal(blk, want) {
			return true
		}
		if !bytes.Equal(blk, make([]byte, loopLen)) {
			t.Errorf("block %d holds neither its pattern nor zeros", i)
		}
		return false
	}
	split := -1 // first block in the new top
	for i := range total {
		inFrozen, inTop := holds(frozen, i), holds(top, i)
		switch {
		case inFrozen == inTop:
			t.Errorf("block %d: in frozen layer %v, in new top %v; want exactly one", i, inFrozen, inTop)
		case inTop && split < 0:
			split = i
		case inFrozen && split >= 0:
			t.Errorf("block %d is in the frozen layer but block %d before it is in the new top", i, split)
		}
	}
	t.Logf("%d blocks: 0..%d in the frozen layer, %d..%d in the new top", total, split-1, split, total-1)
	if split <= before || split > after+2 || split >= total {
		t.Errorf("first block in the new top is %d; want after %d (logged before the checkpoint), at most %d, and below %d",
			split, before, after+2, total)
	}
	// What the guest wrote before the loop stays in the frozen layer.
	if !bytes.Equal(frozen[patternOff:patternOff+patternLen], bytes.Repeat([]byte{0x77}, patternLen)) ||
		!bytes.HasPrefix(frozen[hostOff:], []byte("writer\x00")) {
		t.Errorf("the frozen layer lacks the pattern or hostname")
	}
	// The definition follows: the next start boots on the new top.
	info, err := c.Info(ctx, g.name)
	if err != nil {
		t.Fatal(err)
	}
	if ch := info.Disks[0].Chain; len(ch) < 3 || ch[0].Path != newTop || ch[1].Path != g.top || ch[2].Path != base {
		t.Errorf("persistent chain after the checkpoint: %+v", info.Disks[0].Chain)
	}
	if _, err := c.Checkpoint(ctx, g.name, filepath.Join(g.dir, "top-3.qcow2")); !errors.Is(err, ErrNotRunning) {
		t.Errorf("checkpoint of a shut-off domain: got %v, want ErrNotRunning", err)
	}
}
