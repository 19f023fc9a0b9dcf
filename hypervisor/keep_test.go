package hypervisor

import (
	"context"
	"strings"
	"testing"
	"time"
)

// TestDefineKeeping: a device's edit of its domain (memory, here) survives a
// redefinition that moves its disks onto new chains; a name not defined yet is
// defined whole.
func TestDefineKeeping(t *testing.T) {
	needLibvirt(t)
	c := connect(t, testDriverURI())
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	name := uniqueName("keep")
	cleanupDomain(t, c, name)
	spec := DomainSpec{Name: name, UUID: randomUUID(), MemoryMiB: 128,
		Disks:    []DiskSpec{{Target: "vda", Chain: chain("/nowhere/top.qcow2", "/nowhere/v1.qcow2", "/nowhere/base.qcow2")}},
		Metadata: Metadata{Desktop: "desk", Clone: name}}
	if err := c.DefineKeeping(ctx, spec); err != nil {
		t.Fatal(err)
	}
	x, err := c.DumpXML(ctx, name)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(x, "/nowhere/v1.qcow2") || !strings.Contains(x, ">131072<") {
		t.Fatalf("first define:\n%s", x)
	}
	// The user gives the VM more memory.
	edited := strings.ReplaceAll(x, ">131072<", ">393216<")
	if err := c.DefineXML(ctx, name, edited); err != nil {
		t.Fatal(err)
	}
	// A check-in moves the disk onto the new version's chain.
	spec.Disks = []DiskSpec{{Target: "vda", Chain: chain("/nowhere/top.qcow2", "/nowhere/v2.qcow2", "/nowhere/v1.qcow2", "/nowhere/base.qcow2")},
		{Target: "vdb", Chain: chain("/nowhere/user.qcow2")}}
	if err := c.DefineKeeping(ctx, spec); err != nil {
		t.Fatal(err)
	}
	x, err = c.DumpXML(ctx, name)
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"/nowhere/v2.qcow2", "/nowhere/user.qcow2", ">393216<", spec.UUID} {
		if !strings.Contains(x, want) {
			t.Errorf("after the redefinition the domain lacks %q:\n%s", want, x)
		}
	}
}

// TestHardwareClass: the class a device reports comes from the hypervisor's
// capabilities.
func TestHardwareClass(t *testing.T) {
	needLibvirt(t)
	c := connect(t, testURI)
	class, err := c.HardwareClass(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(class, DefaultMachine+"-") || !strings.HasSuffix(class, "-virtio") || strings.Contains(class, "unknown") {
		t.Fatalf("hardware class %q", class)
	}
	t.Logf("hardware class %s", class)
}
