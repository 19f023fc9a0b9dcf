// Package hypervisor runs clones under libvirt through go-libvirt and libvirtxml:
// define, start, stop, state, undefine, domain XML declaring the whole backing chain
// with formats, and disk-only external snapshots for live checkpoints. No go-libvirt
// type leaves this package.
//
// # Words
//
//   - Conn: one connection to a libvirtd, by URI (ParseURI): qemu:///system, the
//     same with ?socket=PATH for a private libvirtd (scripts/libvirtd.sh), or
//     test:///default, libvirt's in-daemon test driver. Methods take a context; a
//     context that ends makes the call return even when libvirtd does not answer.
//   - Domain: what libvirt runs. cvd names it after the clone and marks it as its
//     own with a metadata element in the namespace MetadataNS; ListManaged lists
//     the marked ones.
//   - DomainSpec: a clone as a domain: identity (name, UUID, MAC), memory and
//     vCPUs, disks, the cloud-init seed image, optional direct kernel boot, a
//     serial log. Type "kvm" only where KVMUsable says the host can really run it,
//     else "qemu" (TCG).
//   - Chain: a disk is declared with every layer, top first, each with its format,
//     in nested <backingStore> elements ending in an empty one. libvirt then
//     neither probes formats (it refuses undeclared ones) nor follows backing
//     names stored in the images.
//   - Checkpoint: a disk-only external snapshot of a running domain without
//     snapshot metadata. The current top is frozen as a read-only layer; a new
//     qcow2 top over it receives the guest's writes. The guest does not notice.
//
// # Lifecycle
//
//	Define → Start → (Checkpoint …) → Shutdown(timeout) or Destroy → Undefine
//
// Shutdown presses the ACPI power button, polls until the domain is shut off and
// destroys it when the timeout passes (ShutdownResult.Forced). Wait polls the
// state until the domain is shut off. Neither subscribes to libvirt events.
//
// # Events and the go-libvirt deadlocks
//
// go-libvirt delivers events on a channel whose subscription, cancelled while
// events still arrive, wedges the whole connection, and which, left undrained,
// is never torn down. Events therefore uses its own connection, always drains,
// and tears down in the one safe order (disconnect, then cancel). See Events.
//
// # Errors
//
// Errors are *Error values naming the operation and the domain, unwrapping to a
// sentinel: ErrNotFound, ErrUnavailable (libvirtd down or gone), ErrBadURI,
// ErrInvalidSpec, ErrExists, ErrNotRunning, ErrRunning, ErrClosed, or a context
// error.
//
// # Test fixtures
//
// The tests boot a tiny guest (scripts/build-guest.sh builds it into .cache/guest
// from Debian's kernel and busybox; guest/init documents its kernel command line)
// under a private libvirtd started through scripts/libvirtd.sh when none is
// reachable.
package hypervisor
