package vm

import (
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"

	"github.com/cvd-project/cvd/disk"
	"github.com/cvd-project/cvd/hypervisor"
	"github.com/cvd-project/cvd/images"
)

// LogsDir is where each domain's serial console log is kept inside the store:
// logs/NAME.serial.log. It is not part of the catalog (store check ignores it).
const LogsDir = "logs"

// Layer is one element of a disk's chain as cvd reports it.
type Layer struct {
	Path   string `json:"path"`
	Format string `json:"format"`
}

// Disk is one disk of a domain as cvd reports it.
type Disk struct {
	Target   string  `json:"target"`
	ReadOnly bool    `json:"read_only,omitempty"`
	Chain    []Layer `json:"chain"`
}

// CloneSpec describes clone c as a domain: its chains from the catalog (the top,
// frozen checkpoints newest first, then the sealed layers), its seed, identity,
// boot and cvd's metadata. Every file of the chains must exist.
func CloneSpec(st *images.Store, c *images.Clone) (hypervisor.DomainSpec, error) {
	chain := func(files []string, layer string) ([]disk.Info, error) {
		var out []disk.Info
		for _, f := range files {
			out = append(out, disk.Info{Path: st.Path(f), Format: disk.FormatQcow2})
		}
		if layer != "" {
			ls, err := st.Chain(layer)
			if err != nil {
				return nil, fmt.Errorf("clone %s: chain of layer %s: %w", c.Name, images.ShortID(layer), err)
			}
			for _, l := range ls {
				out = append(out, disk.Info{Path: st.Path(l.File), Format: disk.FormatQcow2})
			}
		}
		return out, nil
	}
	spec := hypervisor.DomainSpec{
		Name: c.Name, UUID: c.UUID, MAC: c.MAC,
		Metadata:  hypervisor.Metadata{Desktop: c.Desktop, Clone: c.Name},
		SerialLog: filepath.Join(st.Dir(), LogsDir, c.Name+".serial.log"),
	}
	sys, err := chain(c.SystemChainFiles(), c.Layer)
	if err != nil {
		return spec, err
	}
	spec.Disks = append(spec.Disks, hypervisor.DiskSpec{Target: "vda", Chain: sys})
	if c.UserDisk != "" {
		user, err := chain(c.UserChainFiles(), c.UserLayer)
		if err != nil {
			return spec, err
		}
		spec.Disks = append(spec.Disks, hypervisor.DiskSpec{Target: "vdb", Chain: user})
	}
	for _, d := range spec.Disks {
		for _, l := range d.Chain {
			if _, err := os.Stat(l.Path); err != nil {
				return spec, fmt.Errorf("clone %s: disk %s: %w (see cvd store check)", c.Name, d.Target, err)
			}
		}
	}
	if c.Seed != "" {
		spec.SeedISO = st.Path(c.Seed)
	}
	if b := c.Boot; b != nil {
		spec.Kernel, spec.Initrd, spec.Cmdline = b.Kernel, b.Initrd, b.Cmdline
		spec.MemoryMiB, spec.VCPUs = b.MemoryMiB, b.VCPUs
	}
	return spec, nil
}

// DesktopSpec describes a desktop's local VM named name: its system top (vda)
// and user top (vdb, when not "") with the whole chain each top's backing files
// name, resolved inside the store that holds them.
func DesktopSpec(name, systemTop, userTop string) (hypervisor.DomainSpec, error) {
	spec := hypervisor.DomainSpec{Name: name, Metadata: hypervisor.Metadata{Desktop: name, Clone: name}}
	for i, top := range []string{systemTop, userTop} {
		if top == "" {
			continue
		}
		target := []string{"vda", "vdb"}[i]
		// A streamed desktop's top stands on an NBD export of its chain.
		alone, err := disk.Open(top, disk.OpenOptions{ReadOnly: true, NoBacking: true})
		if err != nil {
			return spec, err
		}
		info := alone.Info()
		alone.Close()
		if src, ok := hypervisor.ParseNBDURI(info.BackingName); ok {
			spec.Disks = append(spec.Disks, hypervisor.DiskSpec{Chain: []disk.Info{info}, Target: target, NBD: &src})
			continue
		}
		img, err := disk.Open(top, disk.OpenOptions{ReadOnly: true, AllowedRoots: []string{filepath.Dir(filepath.Dir(top))}})
		if err != nil {
			return spec, err
		}
		var chain []disk.Info
		var keys [][]byte
		for _, l := range disk.Layers(img) {
			chain = append(chain, l.Info())
			keys = append(keys, disk.Passphrase(l)) // an encrypted copy's layers: libvirt gets their keys
		}
		img.Close()
		ds := hypervisor.DiskSpec{Chain: chain, Target: target}
		if slices.ContainsFunc(keys, func(k []byte) bool { return k != nil }) {
			ds.Keys = keys
		}
		spec.Disks = append(spec.Disks, ds)
	}
	return spec, nil
}

// SpecDisks is the chains of spec as cvd reports them.
func SpecDisks(spec hypervisor.DomainSpec) []Disk {
	var out []Disk
	for _, d := range spec.Disks {
		vd := Disk{Target: d.Target}
		for _, l := range d.Chain {
			vd.Chain = append(vd.Chain, Layer{Path: l.Path, Format: string(l.Format)})
		}
		out = append(out, vd)
	}
	return out
}

// RelinkCheckpoints rewrites the absolute backing file names libvirt writes into
// the tops it creates at a checkpoint as names relative to the clones directory
// (the store stays movable). Only for a domain that is not running; failures are
// logged, not fatal: an absolute name inside the store is still valid.
func RelinkCheckpoints(spec hypervisor.DomainSpec, log *slog.Logger) {
	for _, d := range spec.Disks {
		for i := 0; i+1 < len(d.Chain); i++ {
			p, below := d.Chain[i].Path, d.Chain[i+1].Path
			if filepath.Dir(p) != filepath.Dir(below) {
				break // below is a sealed layer: cvd wrote this name itself
			}
			img, err := disk.Open(p, disk.OpenOptions{ReadOnly: true, NoBacking: true})
			if err != nil {
				log.Warn("relink checkpoint top", "file", p, "err", err)
				continue
			}
			name := img.Info().BackingName
			img.Close()
			if name == below {
				if err := disk.SetBacking(p, filepath.Base(below), disk.FormatQcow2); err != nil {
					log.Warn("relink checkpoint top", "file", p, "err", err)
				}
			}
		}
	}
}
