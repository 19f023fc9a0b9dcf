package syncd

import (
	"context"
	"runtime"

	"github.com/cvd-project/cvd/internal/ordered"
)

// encodeOrdered hashes and compresses clusters on several goroutines and hands them
// to consume in the order produce submitted them. A zero entry (data nil) passes
// through. Memory is bounded by a few clusters per worker.
func encodeOrdered(ctx context.Context, opts encodeOptions, produce func(submit func(diskNo byte, idx int64, data []byte, known *Digest) error) error,
	consume func(c encodedCluster, zero bool) error) error {
	workers := max(1, runtime.GOMAXPROCS(0))
	type job struct {
		diskNo byte
		idx    int64
		raw    []byte
		known  *Digest
		c      encodedCluster
		err    error
	}
	pool := newBufPool(workers*8, 64<<10)
	return ordered.Run(ctx, workers, workers*4,
		func(_ context.Context, submit func(*job, bool) error) error {
			return produce(func(diskNo byte, idx int64, data []byte, known *Digest) error {
				j := &job{diskNo: diskNo, idx: idx, known: known}
				if data != nil {
					j.raw = pool.get(len(data))
					copy(j.raw, data)
				}
				return submit(j, data == nil)
			})
		},
		func(j *job) {
			o := opts
			o.known = j.known
			dst := pool.get(len(j.raw))
			j.c, j.err = encodeCluster(j.diskNo, j.idx, j.raw, dst, o)
			if sameBuf(j.c.data, j.raw) {
				pool.put(dst) // sent raw: the encoded bytes are j.raw
			}
		},
		func(j *job) error {
			defer func() {
				if !sameBuf(j.c.data, j.raw) {
					pool.put(j.c.data)
				}
				pool.put(j.raw)
			}()
			if j.err != nil {
				return j.err
			}
			if j.raw == nil {
				return consume(encodedCluster{disk: j.diskNo, idx: j.idx}, true)
			}
			return consume(j.c, false)
		})
}

// sameBuf reports whether a and b start at the same byte (one buffer).
func sameBuf(a, b []byte) bool {
	return len(a) > 0 && len(b) > 0 && &a[0] == &b[0]
}

// bufPool keeps up to a fixed number of buffers for a pipeline's clusters. Unlike
// a sync.Pool, which a garbage collection empties, it keeps them for the whole
// stream: a stream of many clusters allocates (and clears) buffers once.
type bufPool struct {
	free chan []byte
	size int
}

func newBufPool(n, size int) *bufPool {
	return &bufPool{free: make(chan []byte, n), size: size}
}

// get returns a buffer of length n.
func (p *bufPool) get(n int) []byte {
	select {
	case b := <-p.free:
		if cap(b) >= n {
			return b[:n]
		}
	default:
	}
	return make([]byte, n, max(n, p.size))
}

func (p *bufPool) put(b []byte) {
	if b == nil {
		return
	}
	select {
	case p.free <- b[:0]:
	default:
	}
}
