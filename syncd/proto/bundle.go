package proto

import (
	"bufio"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"io"
	"time"

	"github.com/cvd-project/cvd/images"
)

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

// maxBundleLayers bounds the layers a bundle header may list.
const maxBundleLayers = 4096

// ReadBundleHeader reads a bundle's magic and header from the start of its xz
// payload and checks it: the desktop's name, the version, and each layer's
// description (LayerInfo.Validate); the data the layers declare is what their
// import may write.
func ReadBundleHeader(r *bufio.Reader) (*BundleHeader, error) {
	var magic [len(BundleMagic) + 4]byte
	if _, err := io.ReadFull(r, magic[:]); err != nil || string(magic[:len(BundleMagic)]) != BundleMagic {
		return nil, fmt.Errorf("%w: not a cvd bundle", ErrBadRequest)
	}
	n := binary.BigEndian.Uint32(magic[len(BundleMagic):])
	if n > MaxJSON {
		return nil, fmt.Errorf("%w: header of %d bytes", ErrBadRequest, n)
	}
	hb := make([]byte, n)
	if _, err := io.ReadFull(r, hb); err != nil {
		return nil, fmt.Errorf("%w: truncated header", ErrBadRequest)
	}
	var h BundleHeader
	if err := json.Unmarshal(hb, &h); err != nil {
		return nil, fmt.Errorf("%w: header: %v", ErrBadRequest, err)
	}
	if err := images.CheckObjectName("desktop", h.Desktop); err != nil {
		return nil, fmt.Errorf("%w: header: %v", ErrBadRequest, err)
	}
	if h.Version <= 0 || len(h.Layers) == 0 || len(h.Layers) > maxBundleLayers {
		return nil, fmt.Errorf("%w: header: version %d, %d layers", ErrBadRequest, h.Version, len(h.Layers))
	}
	for i := range h.Layers {
		if err := h.Layers[i].Validate(); err != nil {
			return nil, fmt.Errorf("bundle header: %w", err)
		}
	}
	return &h, nil
}
