// Package proto is sync's wire protocol, shared by the server (package syncd)
// and the laptop side (package syncd/laptop): the JSON bodies of the HTTP API
// (manifests, leases, check-in requests and results, the error body and its
// codes), the binary cluster stream (frames, their zstd codec, the ordered
// parallel encoder and decoder), the entry and missing lists, and the layer ID
// that both sides compute from a layer's entries before it exists.
//
// It holds no state: no store, no catalog, no network. README.md ("Sync")
// documents the formats; docs/ARCHITECTURE.md shows where each side uses them.
//
// # Words
//
//   - Entry: one cluster a layer allocates, as its ID lists it: its index and the
//     SHA-256 of its bytes, or "zero". A layer's entries hash to its ID (IDHasher).
//   - Cluster stream: frames of digest-checked clusters (zstd-compressed when that
//     helps), zero runs, references to clusters the receiver holds (ClusterRef),
//     and an end frame with the layer's ID. A stream without its end frame is
//     truncated (ErrStream).
//   - Error code: each sentinel error has a code in the error body (CodeOf,
//     SentinelOf), so a client gets back the sentinel the server returned.
package proto
