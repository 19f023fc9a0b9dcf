package syncd

import (
	"context"
	"runtime"

	"github.com/cvd-project/cvd/internal/ordered"
)

// EncodeOrdered hashes and compresses clusters on several goroutines and hands them
// to consume in the order produce submitted them. A zero entry (data nil) passes
// through. Memory is bounded by a few clusters per worker.
func EncodeOrdered(ctx context.Context, opts EncodeOptions, produce func(submit func(diskNo byte, idx int64, data []byte, known *Digest) error) error,
	consume func(c EncodedCluster, zero bool) error) error {
	workers := max(1, runtime.GOMAXPROCS(0))
	type job struct {
		diskNo byte
		idx    int64
		raw    []byte
		known  *Digest
		c      EncodedCluster
		err    error
	}
	pool := NewBufPool(workers*8, 64<<10)
	return ordered.Run(ctx, workers, workers*4,
		func(_ context.Context, submit func(*job, bool) error) error {
			return produce(func(diskNo byte, idx int64, data []byte, known *Digest) error {
				j := &job{diskNo: diskNo, idx: idx, known: known}
				if data != nil {
					j.raw = pool.Get(len(data))
					copy(j.raw, data)
				}
				return submit(j, data == nil)
			})
		},
		func(j *job) {
			o := opts
			o.Known = j.known
			dst := pool.Get(len(j.raw))
			j.c, j.err = EncodeCluster(j.diskNo, j.idx, j.raw, dst, o)
			if SameBuf(j.c.Data, j.raw) {
				pool.Put(dst) // sent raw: the encoded bytes are j.raw
			}
		},
		func(j *job) error {
			defer func() {
				if !SameBuf(j.c.Data, j.raw) {
					pool.Put(j.c.Data)
				}
				pool.Put(j.raw)
			}()
			if j.err != nil {
				return j.err
			}
			if j.raw == nil {
				return consume(EncodedCluster{Disk: j.diskNo, Idx: j.idx}, true)
			}
			return consume(j.c, false)
		})
}

// SameBuf reports whether a and b start at the same byte (one buffer).
func SameBuf(a, b []byte) bool {
	return len(a) > 0 && len(b) > 0 && &a[0] == &b[0]
}

// BufPool keeps up to a fixed number of buffers for a pipeline's clusters. Unlike
// a sync.Pool, which a garbage collection empties, it keeps them for the whole
// stream: a stream of many clusters allocates (and clears) buffers once.
type BufPool struct {
	free chan []byte
	size int
}

func NewBufPool(n, size int) *BufPool {
	return &BufPool{free: make(chan []byte, n), size: size}
}

// Get returns a buffer of length n.
func (p *BufPool) Get(n int) []byte {
	select {
	case b := <-p.free:
		if cap(b) >= n {
			return b[:n]
		}
	default:
	}
	return make([]byte, n, max(n, p.size))
}

func (p *BufPool) Put(b []byte) {
	if b == nil {
		return
	}
	select {
	case p.free <- b[:0]:
	default:
	}
}
