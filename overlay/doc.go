// Package overlay is chain algebra on package disk alone: rebase (safe and
// unsafe), commit, flatten, the diff of two chains (the conflict set's raw
// material), and the range and copy primitives package desktop builds recompose
// and squash on. Its work follows the clusters the layers really allocate, never
// the virtual size of a disk. It knows no store: the operations on desktops are
// package desktop's.
//
// # Words
//
//   - Shared ancestry: two chains that hold the same file as a layer share that
//     layer and everything below it (a layer's backing file name is part of the
//     layer), so what they share is a common suffix. Shared layers are never read
//     when two chains are compared.
//   - Own layers: the layers of a chain that the other chain does not hold. The
//     clusters where two chains can read differently are those their own layers
//     allocate (data or zero), plus, when an own layer is smaller than a shared
//     one, what the shared layers hold past that cut. These candidates are read
//     from both chains and compared byte for byte: Diff is exact, and a safe
//     Rebase writes only clusters whose content really differs.
//   - Cost: the clusters and bytes an operation reads and writes, reported before
//     it runs (dry run) and after.
//
// # Safety
//
// A sealed layer (a file with no write permission, or one the caller's Sealed
// says is) is never written: Commit into a sealed layer makes a new layer on it,
// and a sealed top is refused by Rebase and Commit.
// Files being built (merged layers, rebuilt tops) are written under ".tmp-"
// names without write barriers, synced, and renamed into place; a crash leaves at
// most such a file. A safe rebase in place only adds clusters the top did not
// hold and that read the same through the old chain, then rewrites the header:
// a crash at any point leaves the same guest view.
package overlay
