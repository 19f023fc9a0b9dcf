package images

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"hash"
	"io"

	"github.com/cvd-project/cvd/disk"
)

// IDVersion names the layer-ID recipe; it is hashed first, so a future recipe
// cannot collide with this one.
const IDVersion = "cvd-layer-id v1"

// LayerStats counts what a layer's own content holds.
type LayerStats struct {
	Clusters     int64 `json:"clusters"`      // clusters listed in the ID
	DataClusters int64 `json:"data_clusters"` // of those, clusters that hold non-zero bytes
	DataBytes    int64 `json:"data_bytes"`
}

// DigestClusterSize is the cluster size a layer's ID is computed with: the qcow2
// cluster size of the layer, or 64 KiB for a raw file (which the store keeps as
// qcow2 with 64 KiB clusters).
func DigestClusterSize(info disk.Info) int {
	if info.Format == disk.FormatQcow2 && info.ClusterSize >= 512 {
		return info.ClusterSize
	}
	return disk.DefaultClusterSize
}

// ComputeID returns the content ID of img's own layer standing on the layer parent
// ("" for none). Open img with OpenOptions.NoBacking: only clusters the layer
// itself allocates count.
//
// The ID is the hex SHA-256 of IDVersion, the parent ID, the virtual size, the
// cluster size, and then, in ascending order, for each guest cluster i that the
// layer allocates (data or zero): i as 8 big-endian bytes, then 'z' if the cluster
// reads as zeros, or 'd' and the SHA-256 of its bytes (of the part below the
// virtual size, for a last partial cluster). A data cluster holding only zeros is
// listed as 'z', so a conversion that turns one into the other keeps the ID. A
// layer with no parent lists no 'z' clusters at all: with nothing below, a zero
// cluster reads the same as an unallocated one, and `qemu-img convert` drops them.
func ComputeID(ctx context.Context, img disk.Image, parent string) (string, LayerStats, error) {
	cs := DigestClusterSize(img.Info())
	h := NewIDHasher(parent, img.Size(), cs)
	err := SumLayer(ctx, img, cs, parent != "", func(s ClusterSum) error {
		h.AddSum(s)
		return nil
	})
	if err != nil {
		return "", LayerStats{}, err
	}
	return h.Sum(), h.Stats(), nil
}

// IDHasher computes a layer ID from its cluster list, in ascending index order,
// without the layer existing yet (a sync peer predicts the ID of what it sends).
// Its state can be saved and restored (encoding.BinaryMarshaler) to resume.
type IDHasher struct {
	h     hash.Hash
	stats LayerStats
	ent   [8 + 1 + sha256.Size]byte
}

// NewIDHasher starts the ID of a layer on parent ("" for none) of the given
// virtual size and digest cluster size.
func NewIDHasher(parent string, size int64, cs int) *IDHasher {
	h := &IDHasher{h: sha256.New()}
	fmt.Fprintf(h.h, "%s\nparent %s\nsize %d\ncluster %d\n", IDVersion, parent, size, cs)
	return h
}

// AddData lists cluster idx with its bytes; nil data means a zero cluster.
func (h *IDHasher) AddData(idx int64, data []byte) {
	if data == nil {
		h.Add(idx, nil)
		return
	}
	h.stats.DataBytes += int64(len(data))
	sum := sha256.Sum256(data)
	h.Add(idx, &sum)
}

// Add lists cluster idx by the SHA-256 of its bytes; nil means a zero cluster.
func (h *IDHasher) Add(idx int64, digest *[sha256.Size]byte) {
	binary.BigEndian.PutUint64(h.ent[:8], uint64(idx))
	h.stats.Clusters++
	if digest == nil {
		h.ent[8] = 'z'
		h.h.Write(h.ent[:9])
		return
	}
	h.stats.DataClusters++
	h.ent[8] = 'd'
	copy(h.ent[9:], digest[:])
	h.h.Write(h.ent[:])
}

// Sum is the layer ID of what was added so far.
func (h *IDHasher) Sum() string { return hex.EncodeToString(h.h.Sum(nil)) }

// Stats counts what was added (DataBytes only through AddData).
func (h *IDHasher) Stats() LayerStats { return h.stats }

// MarshalBinary saves the hash state (not the stats) to resume later.
func (h *IDHasher) MarshalBinary() ([]byte, error) {
	return h.h.(encoding.BinaryMarshaler).MarshalBinary()
}

// UnmarshalBinary restores a state saved by MarshalBinary.
func (h *IDHasher) UnmarshalBinary(b []byte) error {
	if h.h == nil {
		h.h = sha256.New()
	}
	return h.h.(encoding.BinaryUnmarshaler).UnmarshalBinary(b)
}

const (
	mapWindow = 1 << 30 // guest bytes asked of MapLayer at a time (bounds memory)
	readChunk = 1 << 20 // bytes read at a time
)

// zeroChunk is zeros to compare with (a zero array: no cost at start-up).
var zeroChunk [64 << 10]byte

// IsZero reports whether b holds only zero bytes.
func IsZero(b []byte) bool { return isZero(b) }

func isZero(b []byte) bool {
	for len(b) > 0 {
		n := min(len(b), len(zeroChunk))
		if !bytes.Equal(b[:n], zeroChunk[:n]) {
			return false
		}
		b = b[n:]
	}
	return true
}

// ClusterRun is a run of clusters [First, Last] of one state in one layer.
type ClusterRun struct {
	First, Last int64
	Data        bool // else zero
}

// LayerRuns turns img's own MapLayer extents of [win, win+n) into runs of whole
// clusters of size cs, the way layer IDs list them: a cluster that an extent finer
// than the cluster touches counts, and data wins over zero.
func LayerRuns(img disk.Image, win, n, cs int64) ([]ClusterRun, error) {
	exts, err := img.MapLayer(win, n)
	if err != nil {
		return nil, fmt.Errorf("map layer %s at %#x: %w", img.Info().Path, win, err)
	}
	var runs []ClusterRun
	for _, e := range exts {
		if e.State == disk.Unallocated || e.Len <= 0 {
			continue
		}
		first, last := e.Off/cs, (e.Off+e.Len-1)/cs
		data := e.State == disk.Data
		if k := len(runs) - 1; k >= 0 && runs[k].Last >= first {
			// The first cluster is shared with the run before (an extent finer
			// than the cluster): data wins over zero.
			if data && !runs[k].Data {
				if runs[k].First == runs[k].Last {
					runs = runs[:k]
				} else {
					runs[k].Last--
				}
				runs = append(runs, ClusterRun{first, first, true})
			}
			first = runs[len(runs)-1].Last + 1
			if first > last {
				continue
			}
		}
		if k := len(runs) - 1; k >= 0 && runs[k].Last+1 == first && runs[k].Data == data {
			runs[k].Last = last
		} else {
			runs = append(runs, ClusterRun{first, last, data})
		}
	}
	return runs, nil
}

// WalkLayer calls fn, in ascending order, for each cluster of size cs that img's own
// layer allocates, with the cluster's bytes, or nil when it reads as zeros. Without
// keepZero, clusters that read as zeros are skipped. data is only valid during fn.
// It lists exactly what ComputeID hashes.
func WalkLayer(ctx context.Context, img disk.Image, cs int, keepZero bool, fn func(idx int64, data []byte) error) error {
	return WalkLayerFrom(ctx, img, cs, keepZero, 0, fn)
}

// WalkLayerFrom is WalkLayer starting at cluster index from (a resumed transfer).
func WalkLayerFrom(ctx context.Context, img disk.Image, cs int, keepZero bool, from int64, fn func(idx int64, data []byte) error) error {
	size := img.Size()
	c := int64(cs)
	buf := make([]byte, max(readChunk, cs))
	start := from * c / mapWindow * mapWindow
	for win := start; win < size; win += mapWindow {
		if err := ctx.Err(); err != nil {
			return err
		}
		runs, err := LayerRuns(img, win, min(mapWindow, size-win), c)
		if err != nil {
			return err
		}
		for _, r := range runs {
			if r.Last < from {
				continue
			}
			r.First = max(r.First, from)
			if !r.Data {
				if !keepZero {
					continue
				}
				for i := r.First; i <= r.Last; i++ {
					if err := fn(i, nil); err != nil {
						return err
					}
				}
				continue
			}
			per := int64(len(buf)) / c
			for i := r.First; i <= r.Last; i += per {
				if err := ctx.Err(); err != nil {
					return err
				}
				cnt := min(per, r.Last-i+1)
				off := i * c
				l := min(cnt*c, size-off)
				if _, err := img.ReadAt(buf[:l], off); err != nil && err != io.EOF {
					return fmt.Errorf("read %s at %#x: %w", img.Info().Path, off, err)
				}
				for j := int64(0); j < cnt; j++ {
					lo := j * c
					hi := min(lo+c, l)
					b := buf[lo:hi]
					if isZero(b) {
						if !keepZero {
							continue
						}
						b = nil
					}
					if err := fn(i+j, b); err != nil {
						return err
					}
				}
			}
		}
	}
	return nil
}
