package syncd

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"io"

	"github.com/cvd-project/cvd/disk"
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

const (
	mapWindow = 1 << 30 // guest bytes asked of MapLayer at a time (bounds memory)
	readChunk = 1 << 20 // bytes read at a time
)

var zeroChunk = make([]byte, readChunk)

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

// clusterRun is a run of clusters [first, last] of one state in one layer.
type clusterRun struct {
	first, last int64
	data        bool // else zero
}

// layerRuns turns MapLayer's extents of [win, win+n) into runs of whole clusters,
// the way images lists them: a cluster that an extent finer than the cluster
// touches counts, and data wins over zero.
func layerRuns(img disk.Image, win, n, c int64) ([]clusterRun, error) {
	exts, err := img.MapLayer(win, n)
	if err != nil {
		return nil, fmt.Errorf("map layer %s at %#x: %w", img.Info().Path, win, err)
	}
	var runs []clusterRun
	for _, e := range exts {
		if e.State == disk.Unallocated || e.Len <= 0 {
			continue
		}
		first, last := e.Off/c, (e.Off+e.Len-1)/c
		data := e.State == disk.Data
		if k := len(runs) - 1; k >= 0 && runs[k].last >= first {
			if data && !runs[k].data {
				if runs[k].first == runs[k].last {
					runs = runs[:k]
				} else {
					runs[k].last--
				}
				runs = append(runs, clusterRun{first, first, true})
			}
			first = runs[len(runs)-1].last + 1
			if first > last {
				continue
			}
		}
		if k := len(runs) - 1; k >= 0 && runs[k].last+1 == first && runs[k].data == data {
			runs[k].last = last
		} else {
			runs = append(runs, clusterRun{first, last, data})
		}
	}
	return runs, nil
}

// walkClusters calls fn, in ascending order, for each cluster of size cs that img's
// own layer allocates, from cluster index from on, with the cluster's bytes, or nil
// when it reads as zeros. Without keepZero, clusters that read as zeros are
// skipped (a layer without a parent). data is only valid during fn. It lists
// exactly what images.ComputeID hashes.
func walkClusters(ctx context.Context, img disk.Image, cs int, keepZero bool, from int64, fn func(idx int64, data []byte) error) error {
	size := img.Size()
	c := int64(cs)
	buf := make([]byte, max(readChunk, cs))
	start := from * c / mapWindow * mapWindow
	for win := start; win < size; win += mapWindow {
		if err := ctx.Err(); err != nil {
			return err
		}
		runs, err := layerRuns(img, win, min(mapWindow, size-win), c)
		if err != nil {
			return err
		}
		for _, r := range runs {
			if r.last < from {
				continue
			}
			r.first = max(r.first, from)
			if !r.data {
				if !keepZero {
					continue
				}
				for i := r.first; i <= r.last; i++ {
					if err := fn(i, nil); err != nil {
						return err
					}
				}
				continue
			}
			per := int64(len(buf)) / c
			for i := r.first; i <= r.last; i += per {
				if err := ctx.Err(); err != nil {
					return err
				}
				cnt := min(per, r.last-i+1)
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

// layerHasData reports whether img's own layer allocates anything (data or zero).
func layerHasData(img disk.Image) (bool, error) {
	size := img.Size()
	for win := int64(0); win < size; win += mapWindow {
		exts, err := img.MapLayer(win, min(mapWindow, size-win))
		if err != nil {
			return false, err
		}
		for _, e := range exts {
			if e.State != disk.Unallocated && e.Len > 0 {
				return true, nil
			}
		}
	}
	return false, nil
}
