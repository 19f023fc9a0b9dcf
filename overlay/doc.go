// Package overlay is the composer: rebase (safe and unsafe), commit, flatten, diff of
// two chains, squash of versions, and recompose with a conflict report and a cost
// estimate. Its work follows the clusters the layers really allocate, never the
// virtual size of a disk. It builds on package disk, and on package images for the
// operations on desktops (Recompose, Squash).
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
//   - Lower layers: a desktop's base and app layers. Its own delta is what sits
//     above them: its own version layers and its writable top.
//   - Conflict set: the clusters that changed between a desktop's old and new
//     lower layers (the Diff of the two, computed once per pair of lower layers,
//     not once per desktop) and that its own delta also holds. Moving the delta
//     over the new layers (an unsafe rebase of the delta) would hide the new
//     layers' content there.
//   - Policies: keep (move a desktop when its conflict set is empty, else leave
//     it and list it), refresh (drop the system delta), force (move the delta
//     even over conflicts; the delta's clusters win).
//   - Cost: the clusters and bytes an operation reads and writes, reported before
//     it runs (dry run) and after.
//
// # Safety
//
// A sealed layer (a file with no write permission, or a layer of the store) is
// never written: Commit into a sealed layer makes a new layer on it, Squash and
// Recompose make new layers, and a sealed top is refused by Rebase and Commit.
// Files being built (merged layers, rebuilt tops) are written under ".tmp-"
// names without write barriers, synced, and renamed into place; a crash leaves at
// most such a file. A safe rebase in place only adds clusters the top did not
// hold and that read the same through the old chain, then rewrites the header:
// a crash at any point leaves the same guest view. A desktop is switched to its
// new chain in one store transaction, so it is always wholly on its old chain or
// wholly on its new one.
package overlay
