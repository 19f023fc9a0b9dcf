// Package clone makes linked clones of a desktop or a layer: writable tops on a sealed
// chain, one or thousands at a time, each with its own machine identity (UUID, MAC,
// hostname) and cloud-init NoCloud seed image. Identities are never synced.
//
// # Words
//
//   - Clone: a record in the store (images.Clone) and its files in the store's
//     clones directory: NAME.qcow2 (the system top), NAME.user.qcow2 (a user top,
//     when the desktop has a user disk) and NAME.seed.iso.
//   - Top: a qcow2 v3 overlay whose backing file name is "../layers/<id>.qcow2"
//     (relative, inside the store) with the backing format recorded. It holds a
//     header, a refcount table and block, and an empty L1 table: no data is copied.
//   - Template: the bytes of one top made by disk.CreateFile. All tops on the same
//     layer in the same directory are byte-for-byte the same, so Create opens the
//     chain once, makes the template, and writes each top as the template's few
//     non-zero 4 KiB blocks (the rest of the file is a hole).
//   - Identity: a random version-4 UUID (also the cloud-init instance-id), a random
//     locally administered unicast MAC 02:xx:xx:xx:xx:xx unique in the store, a
//     hostname made from the clone's name (RFC 1123 label), and, when the source's
//     ext4 file system holds a machine-id (it has booted), the UUID's digits
//     written over /etc/machine-id in the clone's own top.
//   - Seed image: ISO 9660 made with go-diskfs, volume label "cidata", Rock Ridge
//     and Joliet names, files meta-data (instance-id, local-hostname) and user-data
//     (#cloud-config with the hostname), as cloud-init's NoCloud datasource reads.
//
// # Atomicity
//
// Create journals every file it will write (images.Store.Begin), writes them in
// parallel, syncs the file system once (or each file), and records all clones in
// one transaction: a crash leaves no clone half made, and the store's next open
// removes the files. Removing clones never touches a layer.
package clone
