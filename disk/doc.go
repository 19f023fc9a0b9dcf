// Package disk is cvd's qcow2 and raw disk-image engine: it opens an image with its
// backing chain, reads through the chain, writes with copy-on-write, creates overlays,
// maps allocation per layer and per chain, and checks and repairs refcounts.
//
// It is the leaf of the project: it imports nothing else from cvd.
//
// # Words
//
//   - Guest offset: a byte offset in the virtual disk the guest sees.
//   - Host offset: a byte offset in the image file.
//   - Cluster: the unit of allocation, copy-on-write and refcounting (512 B to 2 MiB,
//     64 KiB by default). Guest cluster i covers guest bytes [i*cs, (i+1)*cs).
//   - L1 table: a contiguous array of 8-byte entries, each pointing to an L2 table.
//   - L2 table: one cluster of 8-byte entries, one per guest cluster: unallocated (0),
//     zero (v3 flag bit 0), a standard host cluster (bits 9-55), or a compressed
//     descriptor (bit 62).
//   - Refcount table and refcount blocks: how many references each host cluster has.
//     0 is free, 1 is owned by exactly one table entry, more is shared (internal snapshots).
//   - Backing chain: an unallocated guest cluster reads from the backing file, or as
//     zeros past the backing file's end. Layer 0 is the top; layer k is k steps down.
//
// # Safety
//
// A backing file name found inside an image is resolved relative to the image's
// directory and must land inside one of the allowed roots; loops and chains deeper
// than MaxDepth are refused. Every table size and offset read from a file is checked
// against the file's size and fixed limits before it is used, so a hostile image gets
// a *FormatError (which unwraps to ErrCorrupt) rather than a panic or an unbounded
// allocation.
//
// Metadata is written in QEMU's crash-safe order: refcounts before the data they
// cover, data before the L2 entry that points to it, an L2 table before the L1 entry
// that points to it, with a flush (fsync) at each barrier. A crash can leak clusters
// (Check repairs leaks) but never leaves a reference to a free cluster.
//
// # Concurrency
//
// All methods of an Image are safe for concurrent use. Reads run in parallel; writes,
// write-zeroes, discards and flushes of one image are serialized by the image's lock
// and exclude reads of that image while they run. Two Image values (or two processes)
// must never write the same file: cvd takes no file locks, and the store above this
// package makes sure a writable top has a single writer.
package disk
