package proto

import (
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"fmt"

	"github.com/cvd-project/cvd/images"
)

// Digest is the SHA-256 of a cluster's bytes (of the part below the virtual size,
// for a last partial cluster).
type Digest [sha256.Size]byte

func (d Digest) String() string { return hex.EncodeToString(d[:]) }

// Entry is one cluster a layer allocates, as its ID lists it: the guest cluster
// index and either Zero or the digest of its bytes.
type Entry struct {
	Index  int64
	Zero   bool
	Digest Digest
}

// IDHasher is images.IDHasher fed with Entries, counting them (its saved state
// carries the counts, which images.IDHasher's does not).
type IDHasher struct {
	h           *images.IDHasher
	Count, Data int64
}

func NewIDHasher(parent string, size int64, cs int) *IDHasher {
	return &IDHasher{h: images.NewIDHasher(parent, size, cs)}
}

func (h *IDHasher) Add(e Entry) {
	h.Count++
	if e.Zero {
		h.h.Add(e.Index, nil)
		return
	}
	h.Data++
	d := [32]byte(e.Digest)
	h.h.Add(e.Index, &d)
}

func (h *IDHasher) Sum() string { return h.h.Sum() }

// State and restore let a resumed fetch continue the hash where it stopped.
func (h *IDHasher) State() ([]byte, error) {
	b, err := h.h.MarshalBinary()
	if err != nil {
		return nil, err
	}
	return binary.BigEndian.AppendUint64(binary.BigEndian.AppendUint64(b, uint64(h.Count)), uint64(h.Data)), nil
}

func (h *IDHasher) Restore(b []byte) error {
	if len(b) < 16 {
		return fmt.Errorf("hash state too short")
	}
	n := len(b) - 16
	h.Count = int64(binary.BigEndian.Uint64(b[n:]))
	h.Data = int64(binary.BigEndian.Uint64(b[n+8:]))
	return h.h.UnmarshalBinary(b[:n])
}

// MapWindow is the guest bytes asked of MapLayer at a time (bounds memory).
const MapWindow = 1 << 30
