package images

import (
	"context"
	"crypto/sha256"
	"fmt"
	"io"
	"runtime"

	"github.com/cvd-project/cvd/disk"
	"github.com/cvd-project/cvd/internal/ordered"
)

// ClusterSum is one cluster of a layer walk by SumLayer.
type ClusterSum struct {
	Index  int64
	Zero   bool              // the cluster reads as zeros (Digest and Len unset)
	Digest [sha256.Size]byte // SHA-256 of the cluster's bytes
	Len    int               // bytes hashed (less than the cluster size for a last partial cluster)
}

// sumChunk is how many bytes SumLayer reads at a time (at least one cluster).
const sumChunk = 1 << 20

// SumLayer calls fn, in ascending order, for each cluster of size cs that img's own
// layer allocates, with the SHA-256 of its bytes, or Zero when it reads as zeros
// (skipped without keepZero). It lists what WalkLayer walks, but reads ahead on a
// goroutine and hashes on every CPU, so it runs at the speed of the disk rather
// than of one core's SHA-256.
func SumLayer(ctx context.Context, img disk.Image, cs int, keepZero bool, fn func(ClusterSum) error) error {
	workers := min(runtime.GOMAXPROCS(0), 8)
	if workers < 2 {
		return WalkLayer(ctx, img, cs, keepZero, func(idx int64, data []byte) error {
			s := ClusterSum{Index: idx, Zero: data == nil, Len: len(data)}
			if data != nil {
				s.Digest = sha256.Sum256(data)
			}
			return fn(s)
		})
	}
	type job struct {
		first, last int64 // clusters [first, last]
		buf         []byte
		out         []ClusterSum
	}
	c := int64(cs)
	chunk := max(sumChunk/c, 1)
	// Read buffers, made as the read-ahead needs them (a small layer needs
	// few) and reused.
	bufs := make(chan []byte, 3*workers)
	made := 0
	getBuf := func(ctx context.Context) ([]byte, error) {
		select {
		case b := <-bufs:
			return b, nil
		default:
		}
		if made < cap(bufs) {
			made++
			return make([]byte, chunk*c), nil
		}
		select {
		case b := <-bufs:
			return b, nil
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	read := func(ctx context.Context, submit func(*job, bool) error) error {
		size := img.Size()
		for win := int64(0); win < size; win += mapWindow {
			runs, err := LayerRuns(img, win, min(mapWindow, size-win), c)
			if err != nil {
				return err
			}
			for _, r := range runs {
				if !r.Data {
					if keepZero {
						if err := submit(&job{first: r.First, last: r.Last}, true); err != nil {
							return err
						}
					}
					continue
				}
				for i := r.First; i <= r.Last; i += chunk {
					buf, err := getBuf(ctx)
					if err != nil {
						return err
					}
					last := min(i+chunk-1, r.Last)
					off := i * c
					n := min((last-i+1)*c, size-off)
					if _, err := img.ReadAt(buf[:n], off); err != nil && err != io.EOF {
						return fmt.Errorf("read %s at %#x: %w", img.Info().Path, off, err)
					}
					if err := submit(&job{first: i, last: last, buf: buf[:n]}, false); err != nil {
						return err
					}
				}
			}
		}
		return nil
	}
	hash := func(j *job) {
		for i := j.first; i <= j.last; i++ {
			lo := (i - j.first) * c
			b := j.buf[lo:min(lo+c, int64(len(j.buf)))]
			s := ClusterSum{Index: i}
			if isZero(b) {
				if !keepZero {
					continue
				}
				s.Zero = true
			} else {
				s.Digest, s.Len = sha256.Sum256(b), len(b)
			}
			j.out = append(j.out, s)
		}
	}
	return ordered.Run(ctx, workers, 2*workers, read, hash, func(j *job) error {
		if j.buf == nil { // a zero run: nothing read
			for i := j.first; i <= j.last; i++ {
				if err := fn(ClusterSum{Index: i, Zero: true}); err != nil {
					return err
				}
			}
			return nil
		}
		defer func() { bufs <- j.buf[:cap(j.buf)] }()
		for _, s := range j.out {
			if err := fn(s); err != nil {
				return err
			}
		}
		return nil
	})
}

// AddSum lists a cluster of a SumLayer walk.
func (h *IDHasher) AddSum(s ClusterSum) {
	if s.Zero {
		h.Add(s.Index, nil)
		return
	}
	h.stats.DataBytes += int64(s.Len)
	h.Add(s.Index, &s.Digest)
}
