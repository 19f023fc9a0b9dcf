package proto

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

// RefResolver reads the cluster an R frame names (body: layer ID and index) into
// dst and checks it against the digest.
type RefResolver func(f Frame, d Digest, body, dst []byte) ([]byte, error)

// DecodeOrdered reads frames up to the end frame, checks each data frame's header
// with check, decodes and verifies the clusters on several goroutines and hands
// them to consume in stream order (a zero run comes as a frame with raw nil, and
// only when allowZero). It returns the end frame and its ID bytes; a stream
// without its end frame is an error.
func DecodeOrdered(ctx context.Context, sr *StreamReader, allowZero bool, resolve RefResolver, check func(Frame, Digest) error,
	consume func(Frame, Digest, []byte) error) (Frame, Digest, error) {
	type job struct {
		f       Frame
		d       Digest
		payload []byte
		raw     []byte
		err     error
	}
	workers := 2
	pool := NewBufPool(workers*8, 64<<10)
	var end Frame
	var endID Digest
	err := ordered.Run(ctx, workers, workers*4,
		func(ctx context.Context, submit func(*job, bool) error) error {
			for {
				if err := ctx.Err(); err != nil {
					return err
				}
				f, d, payload, err := sr.Next(pool.Get(0))
				if err != nil {
					return err
				}
				j := &job{f: f, d: d, payload: payload}
				switch f.Kind {
				case KindEnd:
					end, endID = f, d
					return nil
				case KindZero:
					if !allowZero {
						return BadRequest("zero frame in an upload")
					}
					if err := submit(j, true); err != nil {
						return err
					}
					continue
				case KindRef:
					if resolve == nil {
						return BadRequest("reference frame in a stream that cannot have them")
					}
				}
				if err := check(f, d); err != nil {
					return err
				}
				if err := submit(j, false); err != nil {
					return err
				}
			}
		},
		func(j *job) {
			if j.f.Kind == KindRef {
				j.raw, j.err = resolve(j.f, j.d, j.payload, pool.Get(0))
			} else {
				j.raw, j.err = DecodeCluster(j.f, j.d, j.payload, pool.Get(0))
			}
		},
		func(j *job) error {
			defer func() {
				if !SameBuf(j.raw, j.payload) {
					pool.Put(j.raw)
				}
				pool.Put(j.payload)
			}()
			if j.err != nil {
				return j.err
			}
			if j.raw != nil || j.f.Kind == KindZero {
				return consume(j.f, j.d, j.raw)
			}
			return nil
		})
	return end, endID, err
}
