// Package overlay is the composer: rebase (safe and unsafe), commit, flatten, diff of
// two chains, squash of versions, and recompose with a conflict report and a cost
// estimate. Its work follows the clusters the layers really allocate, never the
// virtual size of a disk. It builds on package disk.
package overlay
