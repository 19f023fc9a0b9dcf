package syncd

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

// idHasher is images.IDHasher fed with Entries, counting them (its saved state
// carries the counts, which images.IDHasher's does not).
type idHasher struct {
	h           *images.IDHasher
	count, data int64
}

func newIDHasher(parent string, size int64, cs int) *idHasher {
	return &idHasher{h: images.NewIDHasher(parent, size, cs)}
}

func (h *idHasher) add(e Entry) {
	h.count++
	if e.Zero {
		h.h.Add(e.Index, nil)
		return
	}
	h.data++
	d := [32]byte(e.Digest)
	h.h.Add(e.Index, &d)
}

func (h *idHasher) sum() string { return h.h.Sum() }

// state and restore let a resumed fetch continue the hash where it stopped.
func (h *idHasher) state() ([]byte, error) {
	b, err := h.h.MarshalBinary()
	if err != nil {
		return nil, err
	}
	return binary.BigEndian.AppendUint64(binary.BigEndian.AppendUint64(b, uint64(h.count)), uint64(h.data)), nil
}

func (h *idHasher) restore(b []byte) error {
	if len(b) < 16 {
		return fmt.Errorf("hash state too short")
	}
	n := len(b) - 16
	h.count = int64(binary.BigEndian.Uint64(b[n:]))
	h.data = int64(binary.BigEndian.Uint64(b[n+8:]))
	return h.h.UnmarshalBinary(b[:n])
}

// mapWindow is the guest bytes asked of MapLayer at a time (bounds memory).
const mapWindow = 1 << 30
