package hypervisor

import (
	"errors"
	"strings"
	"testing"

	"github.com/cvd-project/cvd/disk"
	"libvirt.org/go/libvirtxml"
)

func chain(paths ...string) []disk.Info {
	var c []disk.Info
	for _, p := range paths {
		f := disk.FormatQcow2
		if strings.HasSuffix(p, ".raw") {
			f = disk.FormatRaw
		}
		c = append(c, disk.Info{Path: p, Format: f})
	}
	return c
}

func validSpec() DomainSpec {
	return DomainSpec{
		Name: "cvd-unit", UUID: "0F8C7E9A-1B2C-4D3E-8F90-A1B2C3D4E5F6", MAC: "52:54:00:12:34:56",
		MemoryMiB: 256, VCPUs: 2,
		Disks: []DiskSpec{
			{Target: "vda", Chain: chain("/s/top.qcow2", "/s/app.qcow2", "/s/base.raw")},
			{Target: "vdb", Chain: chain("/s/user.qcow2"), ReadOnly: true},
		},
		SeedISO: "/s/seed.iso", SerialLog: "/s/serial.log",
		Kernel: "/g/vmlinux", Initrd: "/g/initrd", Cmdline: "console=ttyS0",
		Metadata: Metadata{Desktop: "desk", Clone: "desk-1"},
	}
}

func TestSpecXMLChain(t *testing.T) {
	x, err := validSpec().XML()
	if err != nil {
		t.Fatal(err)
	}
	var d libvirtxml.Domain
	if err := d.Unmarshal(x); err != nil {
		t.Fatalf("%v\n%s", err, x)
	}
	if d.Type != "qemu" || d.UUID != "0f8c7e9a-1b2c-4d3e-8f90-a1b2c3d4e5f6" || d.Memory.Value != 256 || d.VCPU.Value != 2 {
		t.Errorf("type %q uuid %q memory %d vcpu %d", d.Type, d.UUID, d.Memory.Value, d.VCPU.Value)
	}
	if len(d.Devices.Disks) != 3 {
		t.Fatalf("%d disks, want 3 (two and the seed)\n%s", len(d.Devices.Disks), x)
	}
	vda := d.Devices.Disks[0]
	if vda.Target.Dev != "vda" || vda.Driver.Type != "qcow2" || vda.Source.File.File != "/s/top.qcow2" || vda.ReadOnly != nil {
		t.Errorf("vda: %+v", vda)
	}
	// The whole chain, every layer with its format, then an empty terminator.
	want := []struct{ path, format string }{{"/s/app.qcow2", "qcow2"}, {"/s/base.raw", "raw"}}
	bs := vda.BackingStore
	for i, w := range want {
		if bs == nil || bs.Source == nil || bs.Source.File == nil || bs.Format == nil {
			t.Fatalf("layer %d missing in backingStore\n%s", i+1, x)
		}
		if bs.Source.File.File != w.path || bs.Format.Type != w.format {
			t.Errorf("layer %d: %s %s, want %s %s", i+1, bs.Source.File.File, bs.Format.Type, w.path, w.format)
		}
		bs = bs.BackingStore
	}
	if bs == nil || (bs.Source != nil && bs.Source.File != nil) || bs.Format != nil {
		t.Errorf("chain not terminated by an empty <backingStore/>\n%s", x)
	}
	if !strings.Contains(x, "<format type=\"raw\"></format>") || !strings.Contains(x, "<format type=\"qcow2\"></format>") {
		t.Errorf("formats not declared\n%s", x)
	}
	vdb := d.Devices.Disks[1]
	if vdb.ReadOnly == nil || vdb.BackingStore == nil || vdb.BackingStore.Format != nil {
		t.Errorf("vdb: read-only single layer, got %+v", vdb)
	}
	seed := d.Devices.Disks[2]
	if seed.Target.Dev != "vdc" || seed.ReadOnly == nil || seed.Driver.Type != "raw" || seed.Source.File.File != "/s/seed.iso" {
		t.Errorf("seed: %+v %+v", seed.Target, seed.Driver)
	}
	if d.OS.Kernel != "/g/vmlinux" || d.OS.Initrd != "/g/initrd" || d.OS.Cmdline != "console=ttyS0" {
		t.Errorf("os: %+v", d.OS)
	}
	if len(d.Devices.Interfaces) != 1 || d.Devices.Interfaces[0].MAC.Address != "52:54:00:12:34:56" ||
		d.Devices.Interfaces[0].Source.User == nil {
		t.Errorf("interface: %+v", d.Devices.Interfaces)
	}
	if len(d.Devices.Serials) != 1 || d.Devices.Serials[0].Source.File == nil || d.Devices.Serials[0].Source.File.Path != "/s/serial.log" {
		t.Errorf("serial: %+v", d.Devices.Serials)
	}
	m, ok := findMetadata(d.Metadata.XML)
	if !ok || m != (Metadata{Desktop: "desk", Clone: "desk-1"}) {
		t.Errorf("metadata %q: %+v %v", d.Metadata.XML, m, ok)
	}
	if !strings.Contains(d.Metadata.XML, `xmlns:cvd="`+MetadataNS+`"`) {
		t.Errorf("metadata without its namespace: %s", d.Metadata.XML)
	}
}

func TestSpecXMLDefaults(t *testing.T) {
	s := DomainSpec{Name: "plain", Disks: []DiskSpec{{Target: "vda", Chain: chain("/a.qcow2")}}, Type: "kvm"}
	x, err := s.XML()
	if err != nil {
		t.Fatal(err)
	}
	var d libvirtxml.Domain
	if err := d.Unmarshal(x); err != nil {
		t.Fatal(err)
	}
	if d.Type != "kvm" || d.CPU == nil || d.CPU.Mode != "host-passthrough" {
		t.Errorf("kvm domain: type %q cpu %+v", d.Type, d.CPU)
	}
	if d.Memory.Value != DefaultMemoryMiB || d.VCPU.Value != DefaultVCPUs || d.OS.Type.Machine != DefaultMachine {
		t.Errorf("defaults: %d MiB, %d vcpus, machine %q", d.Memory.Value, d.VCPU.Value, d.OS.Type.Machine)
	}
	if len(d.OS.BootDevices) != 1 || d.OS.BootDevices[0].Dev != "hd" || d.OS.Kernel != "" {
		t.Errorf("boot: %+v", d.OS)
	}
	if len(d.Devices.Interfaces) != 0 || d.Devices.Serials[0].Source.Pty == nil {
		t.Errorf("no MAC means no interface; no log means a pty serial")
	}
	if d.Features == nil || d.Features.ACPI == nil {
		t.Errorf("ACPI is needed for a graceful shutdown")
	}
}

func TestSpecXMLInvalid(t *testing.T) {
	tests := []struct {
		name string
		edit func(*DomainSpec)
		want string
	}{
		{"empty name", func(s *DomainSpec) { s.Name = "" }, "domain names"},
		{"slash in name", func(s *DomainSpec) { s.Name = "a/b" }, "domain names"},
		{"bad uuid", func(s *DomainSpec) { s.UUID = "1234" }, "UUID"},
		{"bad mac", func(s *DomainSpec) { s.MAC = "52:54:00" }, "MAC"},
		{"bad type", func(s *DomainSpec) { s.Type = "xen" }, "domain type"},
		{"bad target", func(s *DomainSpec) { s.Disks[0].Target = "sda" }, "target"},
		{"target twice", func(s *DomainSpec) { s.Disks[1].Target = "vda" }, "used twice"},
		{"empty chain", func(s *DomainSpec) { s.Disks[0].Chain = nil }, "empty chain"},
		{"no path", func(s *DomainSpec) { s.Disks[0].Chain[1].Path = "" }, "no path"},
		{"raw in the middle", func(s *DomainSpec) { s.Disks[0].Chain[1].Format = disk.FormatRaw }, "is raw but has a layer below"},
		{"unknown format", func(s *DomainSpec) { s.Disks[0].Chain[0].Format = "vmdk" }, "format"},
		{"relative kernel", func(s *DomainSpec) { s.Kernel = "vmlinux" }, "absolute"},
		{"relative seed", func(s *DomainSpec) { s.SeedISO = "seed.iso" }, "absolute"},
		{"relative serial log", func(s *DomainSpec) { s.SerialLog = "log" }, "absolute"},
		{"nothing to boot", func(s *DomainSpec) { s.Disks, s.Kernel = nil, "" }, "nothing to boot"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := validSpec()
			s.Disks[0].Chain = append([]disk.Info(nil), s.Disks[0].Chain...)
			tt.edit(&s)
			_, err := s.XML()
			if !errors.Is(err, ErrInvalidSpec) || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("got %v, want ErrInvalidSpec mentioning %q", err, tt.want)
			}
		})
	}
}

func TestParseURI(t *testing.T) {
	t.Setenv("LIBVIRT_DEFAULT_URI", "")
	good := []struct {
		uri, driver, driverURI, socket string
	}{
		{"", "qemu", "qemu:///system", DefaultSocket},
		{"qemu:///system", "qemu", "qemu:///system", DefaultSocket},
		{"qemu:///system?socket=/tmp/x/libvirt-sock", "qemu", "qemu:///system", "/tmp/x/libvirt-sock"},
		{"qemu+unix:///system?socket=/s", "qemu", "qemu:///system", "/s"},
		{"test:///default", "test", "test:///default", DefaultSocket},
		{"test:///default?socket=/s", "test", "test:///default", "/s"},
	}
	for _, g := range good {
		tg, err := ParseURI(g.uri)
		if err != nil {
			t.Errorf("%q: %v", g.uri, err)
			continue
		}
		if tg.Driver != g.driver || tg.DriverURI != g.driverURI || tg.Socket != g.socket {
			t.Errorf("%q: %+v", g.uri, tg)
		}
	}
	bad := []struct{ uri, want string }{
		{"xen:///system", "driver"},
		{"qemu+ssh://host/system", "transport"},
		{"qemu+tcp://host/system", "transport"},
		{"qemu://host/system", "remote host"},
		{"qemu:///session", "qemu:///system"},
		{"qemu:///system?mode=legacy", "parameter"},
		{"qemu:///system?socket=relative", "absolute"},
		{"/run/libvirt/libvirt-sock", "scheme"},
		{"test://", "test driver needs a path"},
		{"%zz", "invalid"},
	}
	for _, b := range bad {
		_, err := ParseURI(b.uri)
		if !errors.Is(err, ErrBadURI) || !strings.Contains(err.Error(), b.want) {
			t.Errorf("%q: got %v, want ErrBadURI mentioning %q", b.uri, err, b.want)
		}
	}
	t.Setenv("LIBVIRT_DEFAULT_URI", "test:///default")
	if tg, err := ParseURI(""); err != nil || tg.Driver != "test" {
		t.Errorf("LIBVIRT_DEFAULT_URI not honoured: %+v %v", tg, err)
	}
}

func TestErrorText(t *testing.T) {
	err := opErr("start", "vm1", ErrNotFound, "no domain with matching name 'vm1'")
	if !errors.Is(err, ErrNotFound) {
		t.Fatal("does not unwrap to ErrNotFound")
	}
	if got := err.Error(); got != `start domain "vm1": domain not found: no domain with matching name 'vm1'` {
		t.Errorf("%q", got)
	}
}

// TestSpecXMLNBD: a top over an NBD export declares a network backing store
// (raw, nbd over a unix socket) and ends the chain there.
func TestSpecXMLNBD(t *testing.T) {
	s := validSpec()
	s.Disks[0] = DiskSpec{Target: "vda", Chain: chain("/s/top.qcow2"), NBD: &NBDSource{Socket: "/run/cvd/desk.sock", Export: "system"}}
	x, err := s.XML()
	if err != nil {
		t.Fatal(err)
	}
	var d libvirtxml.Domain
	if err := d.Unmarshal(x); err != nil {
		t.Fatal(err)
	}
	bs := d.Devices.Disks[0].BackingStore
	if bs == nil || bs.Format == nil || bs.Format.Type != "raw" || bs.Source == nil || bs.Source.Network == nil {
		t.Fatalf("no NBD backing store:\n%s", x)
	}
	n := bs.Source.Network
	if n.Protocol != "nbd" || n.Name != "system" || len(n.Hosts) != 1 || n.Hosts[0].Transport != "unix" || n.Hosts[0].Socket != "/run/cvd/desk.sock" {
		t.Fatalf("NBD source %+v\n%s", n, x)
	}
	if end := bs.BackingStore; end == nil || end.Format != nil || (end.Source != nil && (end.Source.File != nil || end.Source.Network != nil)) {
		t.Fatalf("chain not ended below the export:\n%s", x)
	}
	s.Disks[0].NBD.Socket = "relative.sock"
	if _, err := s.XML(); err == nil {
		t.Fatal("a relative socket path was accepted")
	}
}

func TestParseNBDURI(t *testing.T) {
	cases := []struct {
		in   string
		want NBDSource
		ok   bool
	}{
		{"nbd+unix:///system?socket=/s/nbd.sock", NBDSource{Socket: "/s/nbd.sock", Export: "system"}, true},
		{"nbd+unix:///?socket=/s/nbd.sock", NBDSource{Socket: "/s/nbd.sock"}, true},
		{"nbd+unix:///system?socket=rel.sock", NBDSource{}, false},
		{"nbd+unix:///a/b?socket=/s", NBDSource{}, false},
		{"nbd+unix:///a?socket=/s&x=1", NBDSource{}, false},
		{"nbd://host:10809/system", NBDSource{}, false},
		{"../layers/base.qcow2", NBDSource{}, false},
	}
	for _, c := range cases {
		got, ok := ParseNBDURI(c.in)
		if ok != c.ok || got != c.want {
			t.Errorf("ParseNBDURI(%q) = %+v, %v; want %+v, %v", c.in, got, ok, c.want, c.ok)
		}
		if ok && got.URI() != c.in {
			t.Errorf("URI() = %q, want %q", got.URI(), c.in)
		}
	}
}
