// Package hypervisor runs clones under libvirt through go-libvirt and libvirtxml:
// define, start, stop, state, undefine, domain XML declaring the whole backing chain
// with formats, and disk-only external snapshots for live checkpoints. No go-libvirt
// type leaves this package.
package hypervisor
