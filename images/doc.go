// Package images is the store: sealed layers with content IDs, the desktop catalog,
// versions, devices, leases, the cluster-digest index used for dedup, and garbage
// collection that never removes a layer something still depends on.
//
// # Words
//
//   - Store: a directory holding layer files and writable tops, and a catalog
//     (package catalog: catalog.db, or a PostgreSQL database named in config.json)
//     that is the only source of truth about what the store holds. A file that no
//     record names is not part of the store. Several processes use one store at
//     once; every change is a catalog transaction.
//   - Layer: a sealed qcow2 file, layers/<id>.qcow2, mode 0444, never written again.
//     Its backing file name is "<parent-id>.qcow2" (relative, same directory) with the
//     backing format recorded. Kinds: base (no parent), app, version (both have one).
//   - Layer ID: the hex SHA-256 of the layer's content, see [ComputeID]: parent ID,
//     virtual size, cluster size, and for each guest cluster the layer itself
//     allocates, its index and the SHA-256 of its bytes or "zero". The ID depends on
//     guest content only, never on the file's byte layout, so a `qemu-img convert`
//     of a layer keeps it and two hosts holding the same content agree on it.
//   - Reference (REF): a full ID, a unique ID prefix of at least 4 hex digits
//     (optionally "sha256:"), or a name with a tag, "win11:2026-11". A bare name
//     means NAME:latest, or the only tag NAME has.
//   - Top: a writable qcow2 overlay on a sealed layer: a clone's disk
//     (clones/<name>.qcow2) or a desktop's own delta (desktops/<name>.system.qcow2).
//     Its backing file name is "../layers/<id>.qcow2".
//   - Desktop: a named CVD. Its system disk is a chain base → apps → its own delta;
//     it may have a user disk with its own chain. Each version records the sealed
//     layer the system (and user) disk stands on; Head names the current one.
//   - Clone: a writable top on a sealed chain plus an identity (UUID, MAC, hostname,
//     cloud-init seed image) that is never synced. See package clone. A live
//     checkpoint (cvd vm checkpoint) freezes a clone's top where it is and gives
//     it a new one, clones/<name>.cpN.qcow2: the record keeps the frozen tops in
//     order (Clone.Checkpoints), so its chain is Disk → checkpoints → Layer. The
//     record also says how the clone boots under libvirt (Clone.Boot).
//
// # Catalog buckets (schema version 1)
//
//	meta        "schema" → "1", "store-id" → the store's ID, "migrated-from-bbolt"
//	layers      <id>                      → JSON Layer
//	names       <name>:<tag>              → <id>
//	refs        <id> 0x00 <kind> 0x00 <n> → ""   kind: layer | desktop | clone;
//	                                             "this object stands directly on <id>"
//	desktops    <name>                    → JSON Desktop (versions inside)
//	clones      <name>                    → JSON Clone
//	macs        <mac>                     → <clone name>  (uniqueness of MACs)
//	pending     <8-byte seq>              → JSON list of files (the journal, below)
//
// Package syncd keeps its records in buckets named "sync.*" of the same catalog.
// A store of the bbolt releases (cvd.db, sync/syncd.db) is moved into the catalog
// at its first read-write open, see [LegacyDBFile].
//
// # Crash safety
//
// Every change that makes or removes files goes through the pending journal:
//
//   - Create: one transaction records the final paths in pending; the files are
//     written (a layer under a ".tmp-" name, then fsynced, made read-only and renamed
//     into place; clone tops directly, they are unnamed until committed); a second
//     transaction adds the records and drops the pending entry.
//   - Remove: one transaction deletes the records and records the files in pending;
//     the files are unlinked; a second transaction drops the pending entry.
//
// Every journal entry names the process that wrote it (host, PID, start time), and
// every temporary name starts ".tmp-<pid>.<start>-" (package internal/proc). A
// read-write Open recovers what processes that are gone left: it unlinks the files
// of their pending entries (rolling an interrupted create back, or an interrupted
// removal forward), drops the entries, and removes their ".tmp-*" files; the
// entries and files of running processes are left alone. After a crash at any moment, no half-made
// layer or clone is visible and no record names a missing file. [Store.Check]
// reports what recovery cannot explain: a record without its file, a file without a
// record, a sealed file that is writable or changed since it was sealed.
package images
