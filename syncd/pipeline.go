package syncd

import (
	"context"
	"runtime"
	"sync"
)

// encodeOrdered hashes and compresses clusters on several goroutines and hands them
// to consume in the order produce submitted them. A zero entry (data nil) passes
// through. Memory is bounded by a few clusters per worker.
func encodeOrdered(ctx context.Context, opts encodeOptions, produce func(submit func(diskNo byte, idx int64, data []byte, known *Digest) error) error,
	consume func(c encodedCluster, zero bool) error) error {
	workers := max(1, runtime.GOMAXPROCS(0))
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()

	type job struct {
		diskNo byte
		idx    int64
		raw    []byte
		known  *Digest
		zero   bool
		c      encodedCluster
		err    error
		done   chan struct{}
	}
	pool := newBufPool(workers*8, 64<<10)
	getBuf := func(n int) []byte { return pool.get(n) }
	putBuf := func(b []byte) { pool.put(b) }

	jobs := make(chan *job, workers*2)
	order := make(chan *job, workers*4)
	var wg sync.WaitGroup
	for range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for j := range jobs {
				if !j.zero {
					o := opts
					o.known = j.known
					dst := getBuf(len(j.raw))
					j.c, j.err = encodeCluster(j.diskNo, j.idx, j.raw, dst, o)
					if sameBuf(j.c.data, j.raw) {
						putBuf(dst) // sent raw: the encoded bytes are j.raw
					}
				}
				close(j.done)
			}
		}()
	}
	prodErr := make(chan error, 1)
	go func() {
		defer close(jobs)
		defer close(order)
		prodErr <- produce(func(diskNo byte, idx int64, data []byte, known *Digest) error {
			j := &job{diskNo: diskNo, idx: idx, zero: data == nil, known: known, done: make(chan struct{})}
			if data != nil {
				j.raw = getBuf(len(data))
				copy(j.raw, data)
			}
			select {
			case order <- j:
			case <-ctx.Done():
				return ctx.Err()
			}
			select {
			case jobs <- j:
			case <-ctx.Done():
				close(j.done)
				return ctx.Err()
			}
			return nil
		})
	}()
	var err error
	for j := range order {
		<-j.done
		if err == nil {
			err = j.err
		}
		if err == nil {
			if j.zero {
				err = consume(encodedCluster{disk: j.diskNo, idx: j.idx}, true)
			} else {
				err = consume(j.c, false)
			}
		}
		if err != nil {
			cancel()
		}
		if !sameBuf(j.c.data, j.raw) {
			putBuf(j.c.data)
		}
		putBuf(j.raw)
	}
	wg.Wait()
	if perr := <-prodErr; err == nil {
		err = perr
	}
	return err
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
