// Package laptop is sync's device side: a store that checks desktops out of a
// server (package syncd) and checks them back in, over the wire protocol of
// package syncd/proto, keeping its records with package syncd/state.
//
//   - Check-out: the manifest of the head version; each layer the store lacks is
//     fetched as a cluster stream (clusters the store holds already come as
//     references to them), resumable from its last checkpoint; the desktop gets
//     fresh tops on the head's layers.
//   - Check-in: the tops' entry lists (a map of what each top allocates, with
//     digests), the server's answer of what it lacks, the upload of those, the
//     commit; then the freeze: the tops become the layers of the version the
//     server made (same IDs, nothing copied) and fresh tops start on them.
//   - Agent: renews leases, checks in, and purges copies whose lease expired
//     (offline too).
//   - Offline bundles: ImportBundle sets a desktop up from a bundle the server
//     exported (syncd.Server.Export).
//
// A desktop whose VM runs is not checked in: the CLI asks libvirt, and before
// reading a top this package checks QEMU's lock on the file itself.
package laptop
