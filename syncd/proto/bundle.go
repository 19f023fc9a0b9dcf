package proto

import "time"

// An offline bundle carries a desktop version to a laptop that never reaches the
// server. It is one xz stream (ulikunitz/xz) holding:
//
//	"CVDBNDL1"                 magic
//	4-byte big-endian length, then that many bytes of JSON BundleHeader
//	for each layer of Header.Layers, in order (parents first): its cluster
//	stream, exactly as GET /v1/layers/{id}/clusters sends it but with raw
//	(uncompressed) payloads, since xz compresses the whole
//
// The layers keep their IDs: every cluster is checked against its digest and
// every layer against its ID on import, as on a check-out.

// BundleMagic starts a bundle.
const BundleMagic = "CVDBNDL1"

// BundleHeader describes a bundle.
type BundleHeader struct {
	Desktop string         `json:"desktop"`
	Version int            `json:"version"`
	Created time.Time      `json:"created"`
	Expires time.Time      `json:"expires"` // the imported copy is purged after this
	Disks   []DiskManifest `json:"disks"`
	Layers  []LayerInfo    `json:"layers"` // parents first
	// Lease is the lease the export took for a device, when it named one.
	Lease *Lease `json:"lease,omitempty"`
	// Server is where the desktop came from (informational).
	Server string `json:"server,omitempty"`
}

// SkipStream reads a cluster stream to its end frame.
func SkipStream(sr *StreamReader) error {
	var buf []byte
	for {
		f, _, p, err := sr.Next(buf)
		if err != nil {
			return err
		}
		buf = p
		if f.Kind == KindEnd {
			return nil
		}
	}
}
