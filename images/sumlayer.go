package images

import (
	"context"
	"crypto/sha256"
	"fmt"
	"io"
	"runtime"
	"sync"

	"github.com/cvd-project/cvd/disk"
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
		zero        bool  // a zero run: nothing read
		buf         []byte
		out         []ClusterSum
		done        chan struct{}
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	c := int64(cs)
	chunk := max(sumChunk/c, 1)
	// Read buffers, made as the read-ahead needs them (a small layer needs
	// few) and reused.
	bufs := make(chan []byte, 3*workers)
	made := 0
	getBuf := func() ([]byte, error) {
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
	jobs := make(chan *job, workers)
	order := make(chan *job, 2*workers)
	var wg sync.WaitGroup
	for range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for j := range jobs {
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
				close(j.done)
			}
		}()
	}
	readErr := make(chan error, 1)
	go func() {
		defer close(jobs)
		defer close(order)
		readErr <- func() error {
			send := func(j *job) error {
				select {
				case order <- j:
				case <-ctx.Done():
					return ctx.Err()
				}
				if j.zero {
					close(j.done)
					return nil
				}
				select {
				case jobs <- j:
					return nil
				case <-ctx.Done():
					close(j.done)
					return ctx.Err()
				}
			}
			size := img.Size()
			for win := int64(0); win < size; win += mapWindow {
				runs, err := LayerRuns(img, win, min(mapWindow, size-win), c)
				if err != nil {
					return err
				}
				for _, r := range runs {
					if !r.Data {
						if keepZero {
							if err := send(&job{first: r.First, last: r.Last, zero: true, done: make(chan struct{})}); err != nil {
								return err
							}
						}
						continue
					}
					for i := r.First; i <= r.Last; i += chunk {
						buf, err := getBuf()
						if err != nil {
							return err
						}
						last := min(i+chunk-1, r.Last)
						off := i * c
						n := min((last-i+1)*c, size-off)
						if _, err := img.ReadAt(buf[:n], off); err != nil && err != io.EOF {
							return fmt.Errorf("read %s at %#x: %w", img.Info().Path, off, err)
						}
						if err := send(&job{first: i, last: last, buf: buf[:n], done: make(chan struct{})}); err != nil {
							return err
						}
					}
				}
			}
			return nil
		}()
	}()
	var err error
	for j := range order {
		<-j.done
		if err == nil {
			err = ctx.Err()
		}
		if err == nil && j.zero {
			for i := j.first; i <= j.last && err == nil; i++ {
				err = fn(ClusterSum{Index: i, Zero: true})
			}
		}
		for k := 0; k < len(j.out) && err == nil; k++ {
			err = fn(j.out[k])
		}
		if err != nil {
			cancel()
		}
		if j.buf != nil {
			bufs <- j.buf[:cap(j.buf)]
		}
	}
	wg.Wait()
	if rerr := <-readErr; err == nil && rerr != nil {
		err = rerr
	}
	return err
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
