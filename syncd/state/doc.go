// Package state is what sync keeps in a store, on the server and on a laptop
// alike: its records in the store's catalog (the cluster-digest index, check-in
// sessions, a laptop's checked-out desktops; devices and leases have typed
// tables of their own, see package syncd), and its directory <store>/sync
// (mode 0700) for check-ins being received and layers being fetched; with the
// helpers both sides use on them: the index's lookups, the staging writer that
// writes verified clusters into a layer in batches, reading a cluster back by
// its digest, and adopting a top as the layer a check-in named.
//
// # Words
//
//   - Cluster-digest index: digest of a cluster's bytes → a layer that holds it
//     and its index there. A stale entry (the layer was removed since) costs a
//     resend, never wrong data: a cluster read through it is checked against its
//     digest.
//   - Staging layer: a qcow2 file written without the disk engine's ordering
//     barriers while a transfer runs, checked before it is reused after a crash.
package state
