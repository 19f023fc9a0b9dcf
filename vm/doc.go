// Package vm is the one recipe from a clone or a desktop of the store to a
// libvirt domain, and what cvd does with those domains: provision many clones at
// once, live checkpoints recorded in the catalog, and the hooks sync calls on a
// desktop's domain (stop before a check-out, define after one).
//
// # Words
//
//   - Spec: a hypervisor.DomainSpec whose disks declare their whole backing
//     chains: a clone's from the catalog (top, frozen checkpoints newest first,
//     sealed layers), a desktop's from its tops' backing chains.
//   - Connection setting: the libvirt URI every command uses: its flag, else
//     $CVD_CONNECT, else $LIBVIRT_DEFAULT_URI, else the system libvirtd ([URI]).
//   - Serial log: each clone's console, logs/NAME.serial.log in the store.
//
// Whatever libvirt says, a top that QEMU holds open is never sealed: the
// callers check disk.InUse (QEMU's image locks) before sealing.
package vm
