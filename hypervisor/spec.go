package hypervisor

import (
	"encoding/xml"
	"fmt"
	"net"
	"path/filepath"
	"regexp"
	"strings"

	"github.com/google/uuid"
	"libvirt.org/go/libvirtxml"

	"github.com/cvd-project/cvd/disk"
)

// MetadataNS is the XML namespace of cvd's element in a domain's <metadata>. A
// domain that carries it is managed by cvd (ListManaged).
const MetadataNS = "https://cvd.dev/xmlns/clone/1"

// Defaults of a DomainSpec.
const (
	DefaultMemoryMiB = 512
	DefaultVCPUs     = 1
	DefaultMachine   = "pc"
)

// DomainSpec describes a clone as a libvirt domain.
type DomainSpec struct {
	Name string
	// UUID in canonical form (8-4-4-4-12 hex digits); empty lets libvirt choose.
	UUID string
	// MAC of the one network interface; empty: no interface.
	MAC string
	// Network is the libvirt network the interface joins; empty: user-mode
	// networking (SLIRP, needs no host setup). Bridge, when set, wins.
	Network string
	// Bridge is a host bridge the interface joins.
	Bridge    string
	MemoryMiB uint // 0: DefaultMemoryMiB
	VCPUs     uint // 0: DefaultVCPUs
	// Disks in order; the first is the boot disk.
	Disks []DiskSpec
	// SeedISO is the clone's cloud-init NoCloud seed (ISO9660, label cidata),
	// attached read-only as the virtio disk after the last of Disks (vdb when
	// Disks is one vda).
	SeedISO string
	// Kernel, Initrd and Cmdline boot a kernel directly (the tiny test guest);
	// empty Kernel boots from the first disk.
	Kernel, Initrd, Cmdline string
	// SerialLog receives the first serial port (ttyS0); empty: a pty.
	SerialLog string
	// Metadata marks the domain as cvd's.
	Metadata Metadata
	// Type is the libvirt domain type ("kvm", "qemu", "test"); empty: what the
	// connection can run (Conn.DomainType).
	Type string
	// Machine is the QEMU machine type; empty: DefaultMachine.
	Machine string
	// VNCListen, when set, gives the domain a VNC console listening on that
	// address (a port chosen by libvirt): a desktop run in the data center.
	VNCListen string
}

// DiskSpec is one disk: a backing chain and where the guest sees it.
type DiskSpec struct {
	// Chain lists the layers top first: Chain[0] is the file the guest writes
	// (unless ReadOnly), Chain[i+1] is the backing file of Chain[i]. Only Path
	// and Format of each element are used. All layers are declared in the
	// domain XML with their formats, so libvirt does not probe them.
	Chain []disk.Info
	// Target is the guest device: "vda", "vdb", ...
	Target   string
	ReadOnly bool
	// NBD, when set, is the raw NBD export below the chain's last layer (a
	// streamed desktop's read-only chain, served on a unix socket).
	NBD *NBDSource
	// Keys holds the LUKS passphrase of each encrypted layer (Keys[i] for
	// Chain[i]; nil or missing for a plain one). Define hands them to libvirt
	// as ephemeral, private secrets (SecretUUID names them) and the XML gives
	// each such layer <encryption format='luks'> with its secret.
	Keys [][]byte
}

// SecretUUID is the UUID of the libvirt secret that holds the key of the
// encrypted layer at path (derived from the path: the same layer has the same
// secret in every domain).
func SecretUUID(path string) string {
	return uuid.NewSHA1(secretNamespace, []byte(path)).String()
}

var secretNamespace = uuid.MustParse("6f1c6b4e-5a0d-4d8e-9d4b-2f6c1e0a7c31")

// keyOf is layer i's key, or nil.
func (ds DiskSpec) keyOf(i int) []byte {
	if i < len(ds.Keys) {
		return ds.Keys[i]
	}
	return nil
}

// encryption is the <encryption> of an encrypted layer at path, or nil.
func encryption(key []byte, path string) *libvirtxml.DomainDiskEncryption {
	if len(key) == 0 {
		return nil
	}
	return &libvirtxml.DomainDiskEncryption{Format: "luks", Secrets: []libvirtxml.DomainDiskSecret{{Type: "passphrase", UUID: SecretUUID(path)}}}
}

// NBDSource is an NBD export on a unix socket.
type NBDSource struct {
	Socket, Export string
}

// URI is the export's URI as QEMU writes it into a qcow2 backing file name.
func (n NBDSource) URI() string { return "nbd+unix:///" + n.Export + "?socket=" + n.Socket }

// ParseNBDURI reads an nbd+unix:///EXPORT?socket=PATH URI (what a streamed
// top names as its backing file); ok is false for anything else.
func ParseNBDURI(s string) (NBDSource, bool) {
	rest, ok := strings.CutPrefix(s, "nbd+unix:///")
	if !ok {
		return NBDSource{}, false
	}
	export, query, ok := strings.Cut(rest, "?socket=")
	if !ok || !filepath.IsAbs(query) || strings.ContainsAny(export, "/?&") || strings.Contains(query, "&") {
		return NBDSource{}, false
	}
	return NBDSource{Socket: query, Export: export}, true
}

// Metadata is cvd's element in the domain XML:
//
//	<metadata>
//	  <cvd:clone xmlns:cvd="https://cvd.dev/xmlns/clone/1" desktop="D" clone="C"/>
//	</metadata>
type Metadata struct {
	Desktop string // the CVD (desktop) the clone belongs to
	Clone   string // the clone's name
}

// metaOut writes the element with the cvd: prefix libvirt keeps.
type metaOut struct {
	XMLName xml.Name `xml:"cvd:clone"`
	NS      string   `xml:"xmlns:cvd,attr"`
	Desktop string   `xml:"desktop,attr,omitempty"`
	Clone   string   `xml:"clone,attr,omitempty"`
}

// metaIn reads the element by namespace, whatever its prefix.
type metaIn struct {
	XMLName xml.Name `xml:"https://cvd.dev/xmlns/clone/1 clone"`
	Desktop string   `xml:"desktop,attr"`
	Clone   string   `xml:"clone,attr"`
}

func (m Metadata) element() (string, error) {
	b, err := xml.Marshal(metaOut{NS: MetadataNS, Desktop: m.Desktop, Clone: m.Clone})
	return string(b), err
}

var (
	nameRE   = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.+-]*$`)
	uuidRE   = regexp.MustCompile(`^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$`)
	targetRE = regexp.MustCompile(`^vd[a-z]{1,2}$`)
)

// checkName refuses names libvirt or a file system would mangle.
func checkName(op, name string) error {
	if len(name) > 200 || !nameRE.MatchString(name) {
		return opErr(op, name, ErrInvalidSpec, "domain names are letters, digits and _.+- (starting with a letter or digit), at most 200")
	}
	return nil
}

// XML renders the spec as libvirt domain XML. An empty Type renders "qemu".
func (s DomainSpec) XML() (string, error) {
	d, err := s.domain()
	if err != nil {
		return "", err
	}
	out, err := d.Marshal()
	if err != nil {
		return "", opErr("render", s.Name, ErrInvalidSpec, "%v", err)
	}
	return out, nil
}

func (s DomainSpec) domain() (*libvirtxml.Domain, error) {
	bad := func(format string, args ...any) (*libvirtxml.Domain, error) {
		return nil, opErr("render", s.Name, ErrInvalidSpec, format, args...)
	}
	if err := checkName("render", s.Name); err != nil {
		return nil, err
	}
	if s.UUID != "" && !uuidRE.MatchString(s.UUID) {
		return bad("UUID %q is not in canonical form", s.UUID)
	}
	typ := s.Type
	if typ == "" {
		typ = "qemu"
	}
	switch typ {
	case "kvm", "qemu", "test":
	default:
		return bad("domain type %q (want kvm, qemu or test)", typ)
	}
	mem, vcpus, machine := s.MemoryMiB, s.VCPUs, s.Machine
	if mem == 0 {
		mem = DefaultMemoryMiB
	}
	if vcpus == 0 {
		vcpus = DefaultVCPUs
	}
	if machine == "" {
		machine = DefaultMachine
	}
	if len(s.Disks) == 0 && s.Kernel == "" {
		return bad("no disk and no kernel: nothing to boot")
	}

	d := &libvirtxml.Domain{
		Type:          typ,
		Name:          s.Name,
		UUID:          strings.ToLower(s.UUID),
		Memory:        &libvirtxml.DomainMemory{Value: mem, Unit: "MiB"},
		CurrentMemory: &libvirtxml.DomainCurrentMemory{Value: mem, Unit: "MiB"},
		VCPU:          &libvirtxml.DomainVCPU{Value: vcpus},
		OS: &libvirtxml.DomainOS{
			Type: &libvirtxml.DomainOSType{Arch: "x86_64", Machine: machine, Type: "hvm"},
		},
		Features: &libvirtxml.DomainFeatureList{
			ACPI: &libvirtxml.DomainFeature{},
			APIC: &libvirtxml.DomainFeatureAPIC{},
		},
		Clock:      &libvirtxml.DomainClock{Offset: "utc"},
		OnPoweroff: "destroy",
		OnReboot:   "restart",
		OnCrash:    "destroy",
		Devices:    &libvirtxml.DomainDeviceList{},
	}
	if typ == "test" {
		d.OS.Type.Machine = "" // the test driver knows no machine types
	}
	if typ == "kvm" {
		d.CPU = &libvirtxml.DomainCPU{Mode: "host-passthrough"}
	}
	meta, err := s.Metadata.element()
	if err != nil {
		return bad("metadata: %v", err)
	}
	d.Metadata = &libvirtxml.DomainMetadata{XML: meta}

	if s.Kernel != "" {
		if !filepath.IsAbs(s.Kernel) || (s.Initrd != "" && !filepath.IsAbs(s.Initrd)) {
			return bad("kernel and initrd paths must be absolute")
		}
		d.OS.Kernel, d.OS.Initrd, d.OS.Cmdline = s.Kernel, s.Initrd, s.Cmdline
	} else {
		d.OS.BootDevices = []libvirtxml.DomainBootDevice{{Dev: "hd"}}
	}

	used := map[string]bool{}
	for i, ds := range s.Disks {
		if !targetRE.MatchString(ds.Target) {
			return bad("disk %d: target %q (want vda, vdb, ...)", i, ds.Target)
		}
		if used[ds.Target] {
			return bad("disk %d: target %s used twice", i, ds.Target)
		}
		used[ds.Target] = true
		dd, err := diskXML(ds)
		if err != nil {
			return bad("disk %s: %v", ds.Target, err)
		}
		d.Devices.Disks = append(d.Devices.Disks, dd)
	}
	if s.SeedISO != "" {
		if !filepath.IsAbs(s.SeedISO) {
			return bad("seed image path %q must be absolute", s.SeedISO)
		}
		t := nextTarget(used)
		d.Devices.Disks = append(d.Devices.Disks, libvirtxml.DomainDisk{
			Device:   "disk",
			Driver:   &libvirtxml.DomainDiskDriver{Name: "qemu", Type: "raw"},
			Source:   &libvirtxml.DomainDiskSource{File: &libvirtxml.DomainDiskSourceFile{File: s.SeedISO}},
			Target:   &libvirtxml.DomainDiskTarget{Dev: t, Bus: "virtio"},
			ReadOnly: &libvirtxml.DomainDiskReadOnly{},
			Serial:   "cidata",
		})
	}

	if s.MAC != "" {
		hw, err := net.ParseMAC(s.MAC)
		if err != nil || len(hw) != 6 {
			return bad("MAC %q is not a 6-byte MAC address", s.MAC)
		}
		iface := libvirtxml.DomainInterface{
			MAC:   &libvirtxml.DomainInterfaceMAC{Address: hw.String()},
			Model: &libvirtxml.DomainInterfaceModel{Type: "virtio"},
			// No iPXE option ROM: clones boot from their disk (or a kernel),
			// and the ROM costs about a second of firmware time under TCG.
			ROM: &libvirtxml.DomainROM{Enabled: "no"},
		}
		switch {
		case s.Bridge != "":
			iface.Source = &libvirtxml.DomainInterfaceSource{Bridge: &libvirtxml.DomainInterfaceSourceBridge{Bridge: s.Bridge}}
		case s.Network != "":
			iface.Source = &libvirtxml.DomainInterfaceSource{Network: &libvirtxml.DomainInterfaceSourceNetwork{Network: s.Network}}
		default:
			iface.Source = &libvirtxml.DomainInterfaceSource{User: &libvirtxml.DomainInterfaceSourceUser{}}
		}
		d.Devices.Interfaces = append(d.Devices.Interfaces, iface)
	}

	port := uint(0)
	serial := libvirtxml.DomainSerial{Target: &libvirtxml.DomainSerialTarget{Port: &port}}
	if s.SerialLog != "" {
		if !filepath.IsAbs(s.SerialLog) {
			return bad("serial log path %q must be absolute", s.SerialLog)
		}
		serial.Source = &libvirtxml.DomainChardevSource{File: &libvirtxml.DomainChardevSourceFile{Path: s.SerialLog}}
	} else {
		serial.Source = &libvirtxml.DomainChardevSource{Pty: &libvirtxml.DomainChardevSourcePty{}}
	}
	if typ != "test" {
		d.Devices.Serials = append(d.Devices.Serials, serial)
		// No balloon, no USB, no graphics: nothing the clones need, and less
		// for TCG to emulate.
		d.Devices.MemBalloon = &libvirtxml.DomainMemBalloon{Model: "none"}
		d.Devices.Controllers = append(d.Devices.Controllers, libvirtxml.DomainController{Type: "usb", Model: "none"})
	}
	if s.VNCListen != "" {
		if net.ParseIP(s.VNCListen) == nil {
			return bad("VNC listen address %q is not an IP address", s.VNCListen)
		}
		d.Devices.Graphics = append(d.Devices.Graphics, libvirtxml.DomainGraphic{VNC: &libvirtxml.DomainGraphicVNC{
			Port: -1, AutoPort: "yes", Listen: s.VNCListen,
			Listeners: []libvirtxml.DomainGraphicListener{{Address: &libvirtxml.DomainGraphicListenerAddress{Address: s.VNCListen}}},
		}})
	}
	return d, nil
}

// diskXML declares a disk with its whole backing chain and every layer's format.
func diskXML(ds DiskSpec) (libvirtxml.DomainDisk, error) {
	if len(ds.Chain) == 0 {
		return libvirtxml.DomainDisk{}, fmt.Errorf("empty chain")
	}
	var fmts []string
	var paths []string
	for i, l := range ds.Chain {
		if l.Path == "" {
			return libvirtxml.DomainDisk{}, fmt.Errorf("layer %d has no path", i)
		}
		p, err := filepath.Abs(l.Path)
		if err != nil {
			return libvirtxml.DomainDisk{}, fmt.Errorf("layer %d: %v", i, err)
		}
		switch l.Format {
		case disk.FormatQcow2:
		case disk.FormatRaw:
			if i != len(ds.Chain)-1 {
				return libvirtxml.DomainDisk{}, fmt.Errorf("layer %d (%s) is raw but has a layer below it", i, p)
			}
		default:
			return libvirtxml.DomainDisk{}, fmt.Errorf("layer %d (%s): format %q (want qcow2 or raw)", i, p, l.Format)
		}
		fmts = append(fmts, string(l.Format))
		paths = append(paths, p)
	}
	// Built bottom up; an empty <backingStore/> ends the chain so libvirt does not
	// probe below the last declared layer.
	bs := &libvirtxml.DomainDiskBackingStore{}
	if ds.NBD != nil {
		if !filepath.IsAbs(ds.NBD.Socket) {
			return libvirtxml.DomainDisk{}, fmt.Errorf("NBD socket %q must be absolute", ds.NBD.Socket)
		}
		bs = &libvirtxml.DomainDiskBackingStore{
			Format: &libvirtxml.DomainDiskFormat{Type: "raw"},
			Source: &libvirtxml.DomainDiskSource{Network: &libvirtxml.DomainDiskSourceNetwork{Protocol: "nbd", Name: ds.NBD.Export,
				Hosts: []libvirtxml.DomainDiskSourceHost{{Transport: "unix", Socket: ds.NBD.Socket}}}},
			BackingStore: bs,
		}
	}
	for i := len(paths) - 1; i >= 1; i-- {
		bs = &libvirtxml.DomainDiskBackingStore{
			Format:       &libvirtxml.DomainDiskFormat{Type: fmts[i]},
			Source:       &libvirtxml.DomainDiskSource{File: &libvirtxml.DomainDiskSourceFile{File: paths[i]}, Encryption: encryption(ds.keyOf(i), paths[i])},
			BackingStore: bs,
		}
	}
	dd := libvirtxml.DomainDisk{
		Device:       "disk",
		Driver:       &libvirtxml.DomainDiskDriver{Name: "qemu", Type: fmts[0], Discard: "unmap"},
		Source:       &libvirtxml.DomainDiskSource{File: &libvirtxml.DomainDiskSourceFile{File: paths[0]}, Encryption: encryption(ds.keyOf(0), paths[0])},
		BackingStore: bs,
		Target:       &libvirtxml.DomainDiskTarget{Dev: ds.Target, Bus: "virtio"},
	}
	if ds.ReadOnly {
		dd.ReadOnly = &libvirtxml.DomainDiskReadOnly{}
	}
	return dd, nil
}

// nextTarget is the first vdX not in used.
func nextTarget(used map[string]bool) string {
	for c := 'a'; c <= 'z'; c++ {
		t := "vd" + string(c)
		if !used[t] {
			return t
		}
	}
	return "vdzz"
}
