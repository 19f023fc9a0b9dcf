// Package desktop is a desktop's life on a store's chains: recompose onto new
// base or app layers (with its conflict set and cost first), the switch of a
// desktop in use at its next start, and the squash of its version layers. It
// builds new chains beside the old ones with package overlay's algebra, seals
// the layers into the store (package images) and moves the desktop in one
// catalog transaction.
//
// # Words
//
//   - Lower layers: a desktop's base and app layers. Its own delta is what sits
//     above them: its own version layers and its writable top.
//   - Conflict set: the clusters that changed between a desktop's old and new
//     lower layers (overlay.DiffStats of the two, computed once per pair of lower
//     layers, not once per desktop) and that its own delta also holds. Moving the
//     delta over the new layers (an unsafe rebase of the delta) would hide the
//     new layers' content there.
//   - Policies: keep (move a desktop when its conflict set is empty, else leave
//     it and list it), refresh (drop the system delta), force (move the delta
//     even over conflicts; the delta's clusters win).
//   - In use: a desktop whose VM runs, or that a device holds: it is not moved
//     but marked (images.Desktop.Switch), and ApplySwitch carries the mark out
//     before its next start.
//
// # Safety
//
// New layers are sealed into the store from temporary files (".tmp-<pid>.…",
// removed by the store's recovery once their process is gone); a new layer left
// unused by a crash is one gc removes. A desktop is switched to its new chain in
// one catalog transaction, so it is always wholly on its old chain or wholly on
// its new one.
package desktop
