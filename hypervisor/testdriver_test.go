package hypervisor

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"
)

// uniqueName is a domain name no other test (or run) uses.
func uniqueName(prefix string) string {
	b := make([]byte, 4)
	rand.Read(b)
	return fmt.Sprintf("cvd-test-%s-%x", prefix, b)
}

func randomUUID() string {
	b := make([]byte, 16)
	rand.Read(b)
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	return fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:16])
}

// cleanupDomain destroys and undefines a domain when the test ends.
func cleanupDomain(t *testing.T, c *Conn, name string) {
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		_ = c.Destroy(ctx, name)
		if err := c.Undefine(ctx, name, UndefineSnapshots); err != nil && !errors.Is(err, ErrNotFound) {
			t.Errorf("cleanup: %v", err)
		}
	})
}

// The define/XML/list paths against libvirt's test driver: no QEMU involved.
func TestTestDriverLifecycle(t *testing.T) {
	needLibvirt(t)
	c := connect(t, testDriverURI())
	if c.DomainType() != "test" {
		t.Fatalf("domain type on the test driver: %q", c.DomainType())
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()

	name := uniqueName("td")
	spec := DomainSpec{
		Name: name, UUID: randomUUID(), MAC: "52:54:00:aa:bb:01", MemoryMiB: 128,
		Disks:    []DiskSpec{{Target: "vda", Chain: chain("/nowhere/top.qcow2", "/nowhere/app.qcow2", "/nowhere/base.qcow2")}},
		SeedISO:  "/nowhere/seed.iso",
		Metadata: Metadata{Desktop: "desk", Clone: name},
	}
	cleanupDomain(t, c, name)
	if err := c.Define(ctx, spec); err != nil {
		t.Fatal(err)
	}
	x, err := c.DumpXML(ctx, name)
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"<backingStore type='file'>", "<format type='qcow2'/>", "/nowhere/base.qcow2", MetadataNS, spec.UUID} {
		if !strings.Contains(x, want) {
			t.Errorf("dumpxml lacks %q:\n%s", want, x)
		}
	}
	info, err := c.Info(ctx, name)
	if err != nil {
		t.Fatal(err)
	}
	wantChain := []Layer{{"/nowhere/top.qcow2", "qcow2"}, {"/nowhere/app.qcow2", "qcow2"}, {"/nowhere/base.qcow2", "qcow2"}}
	if !info.Managed || info.Metadata.Desktop != "desk" || info.UUID != spec.UUID ||
		len(info.Disks) != 2 || !slices.Equal(info.Disks[0].Chain, wantChain) || !info.Disks[1].ReadOnly {
		t.Errorf("info: %+v", info)
	}
	if info.Status.State != StateShutoff {
		t.Errorf("a defined domain is shut off, got %v", info.Status)
	}

	// An unmanaged domain next to it is not listed.
	plain := uniqueName("td-plain")
	cleanupDomain(t, c, plain)
	px := fmt.Sprintf("<domain type='test'><name>%s</name><memory unit='MiB'>64</memory><os><type>hvm</type></os></domain>", plain)
	if err := c.DefineXML(ctx, plain, px); err != nil {
		t.Fatal(err)
	}
	list, err := c.ListManaged(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, d := range list {
		names = append(names, d.Name)
	}
	if !slices.Contains(names, name) || slices.Contains(names, plain) {
		t.Errorf("ListManaged = %v: want %s and not %s", names, name, plain)
	}

	// Redefining with the same UUID updates; another UUID under the same name is refused.
	spec.MemoryMiB = 192
	if err := c.Define(ctx, spec); err != nil {
		t.Fatalf("redefine: %v", err)
	}
	other := spec
	other.UUID = randomUUID()
	if err := c.Define(ctx, other); !errors.Is(err, ErrExists) {
		t.Errorf("define %s with another UUID: got %v, want ErrExists", name, err)
	}

	if err := c.Start(ctx, name); err != nil {
		t.Fatal(err)
	}
	if err := c.Start(ctx, name); !errors.Is(err, ErrRunning) {
		t.Errorf("start a running domain: got %v, want ErrRunning", err)
	}
	if st, err := c.State(ctx, name); err != nil || st != StateRunning {
		t.Errorf("state: %v %v", st, err)
	}
	if err := c.Undefine(ctx, name, 0); !errors.Is(err, ErrRunning) {
		t.Errorf("undefine a running domain: got %v, want ErrRunning", err)
	}
	// A Wait that runs out returns the context's error and leaves the
	// connection usable.
	wctx, wcancel := context.WithTimeout(ctx, 300*time.Millisecond)
	_, err = c.Wait(wctx, name)
	wcancel()
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("wait on a running domain: got %v, want DeadlineExceeded", err)
	}
	// The test driver shuts down at once on request.
	r, err := c.Shutdown(ctx, name, 5*time.Second)
	if err != nil || r.Forced || r.Status.State != StateShutoff {
		t.Errorf("shutdown: %+v %v", r, err)
	}
	if r, err := c.Shutdown(ctx, name, time.Second); err != nil || !r.AlreadyOff {
		t.Errorf("shutdown of a shut-off domain: %+v %v", r, err)
	}
	if err := c.Destroy(ctx, name); !errors.Is(err, ErrNotRunning) {
		t.Errorf("destroy a shut-off domain: got %v, want ErrNotRunning", err)
	}
	if err := c.Start(ctx, name); err != nil {
		t.Fatal(err)
	}
	if err := c.Destroy(ctx, name); err != nil {
		t.Fatal(err)
	}
	if s, err := c.Status(ctx, name); err != nil || s.State != StateShutoff || s.Reason != "destroyed" {
		t.Errorf("after destroy: %v %v", s, err)
	}
	// The test driver knows no NVRAM.
	if err := c.Undefine(ctx, name, UndefineNVRAM); !errors.Is(err, ErrUnsupported) {
		t.Errorf("undefine with NVRAM on the test driver: got %v, want ErrUnsupported", err)
	}
	if err := c.Undefine(ctx, name, UndefineSnapshots); err != nil {
		t.Fatal(err)
	}
	if _, err := c.State(ctx, name); !errors.Is(err, ErrNotFound) || !strings.Contains(err.Error(), name) {
		t.Errorf("state after undefine: got %v, want ErrNotFound naming %s", err, name)
	}
}

// TestConcurrentDefines defines many domains at once on one connection to the
// real libvirtd (qemu driver, validated XML): libvirtd 9.0 fails some of them
// with "Unable to parse RNG" when validated defines race; Conn serializes them.
func TestConcurrentDefines(t *testing.T) {
	c := needLibvirt(t)
	base := makeBase(t)
	const n = 12
	errs := make(chan error, n)
	for i := range n {
		name := uniqueName(fmt.Sprintf("def%d", i))
		cleanupDomain(t, c, name)
		go func() {
			spec := DomainSpec{Name: name, UUID: randomUUID(), MemoryMiB: 64, VCPUs: 1,
				Disks: []DiskSpec{{Target: "vda", Chain: chain(base)}}}
			errs <- c.Define(context.Background(), spec)
		}()
	}
	for range n {
		if err := <-errs; err != nil {
			t.Error(err)
		}
	}
}
