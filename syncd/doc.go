// Package syncd is the sync server: the HTTP(S) API of the data-center side that
// devices check desktops out of and back into; devices, leases and their expiry,
// check-in sessions and their commit, offline bundles, and the administrator's
// operations (device add/rm, lease break, rollback). The wire protocol is package
// syncd/proto, the device side package syncd/laptop, and what either side keeps
// in its store package syncd/state. README.md ("Sync") documents the API and its
// binary formats.
//
// # Words
//
//   - Device: a laptop registered on the server and bound to desktops. It
//     authenticates with a token the server keeps only as a SHA-256.
//   - Lease: a device's hold on a desktop, with an expiry. While it runs no other
//     device can check the desktop out; past it the laptop purges its copy, offline
//     too. Devices and leases are typed tables of the catalog (a lease's epoch
//     fences the commit of a check-in made under it); images reads a desktop's
//     holder from them (images.Desktop.Lease).
//   - Manifest: what a check-out answers: the lease, the head version, and each
//     disk's chain of layers by ID.
//   - Entry: one cluster a layer allocates, as its ID lists it: its index and the
//     SHA-256 of its bytes, or "zero". A layer's entries hash to its ID
//     (images.IDHasher), so both sides can name a layer before it exists.
//   - Cluster stream: frames of digest-checked clusters (zstd-compressed when that
//     helps), zero runs, references to clusters the receiver holds, and an end frame
//     with the layer's ID. A stream without its end frame is truncated.
//   - Check-in (session): the laptop's entry lists of its writable tops, the server's
//     answer of which digests it lacks (deduplicated against every layer it holds, by
//     the cluster-digest index), the upload of those, and the commit. Until the commit
//     the server's head has not moved; an interrupted check-in resumes from what the
//     server's staging layers hold.
//   - Freeze: after a commit the laptop seals its tops as the layers of the version the
//     server made (same IDs) and starts fresh tops on them.
//   - Conflict version: a check-in that did not start from the head, kept beside it.
//
// # Where things live
//
// Versions and the head are in the store's catalog, written by package desktop.
// Devices and leases are tables of that catalog; the cluster index, check-in
// sessions and a laptop's checked-out desktops are records of package
// syncd/state in it. Check-ins being received are staged in
// <store>/sync/sessions/, layers being fetched in <store>/sync/fetch/; both are
// written without the disk engine's ordering barriers and checked before reuse.
package syncd
