package disk

import (
	"context"
	"errors"
	"fmt"
	"os"
	"runtime"
	"sync"
)

// ConvertOptions controls Convert.
type ConvertOptions struct {
	Format      Format // FormatQcow2 (default) or FormatRaw
	ClusterSize int    // qcow2 only; 0 means the source's, or 64 KiB
	Compress    string // qcow2 only: "", "deflate" or "zstd"
	// Encrypt makes the qcow2 output LUKS-encrypted (not with Compress).
	Encrypt *Encryption
	// Progress, when set, is called with the guest bytes done and the total.
	Progress func(done, total int64)
}

// convertChunk is the guest bytes read at a time.
const convertChunk = 4 << 20

// Convert writes the guest view of src (its whole chain) into a new image at dst,
// which must not exist. Zero and unallocated ranges stay sparse; only clusters
// that some layer allocates are read. On error or cancellation dst is removed.
func Convert(ctx context.Context, src Image, dst string, opts ConvertOptions) (err error) {
	size := src.Size()
	exts, err := MapChain(src, 0, size)
	if err != nil {
		return fmt.Errorf("map %s: %w", src.Info().Path, err)
	}
	format := opts.Format
	if format == "" {
		format = FormatQcow2
	}
	var w Image
	switch format {
	case FormatRaw:
		if opts.Compress != "" {
			return errors.New("convert: compression needs the qcow2 format")
		}
		f, err := os.OpenFile(dst, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o644)
		if err != nil {
			return err
		}
		if err := f.Truncate(size); err != nil {
			f.Close()
			os.Remove(dst)
			return err
		}
		w = &Raw{f: f, path: dst, size: size}
	case FormatQcow2:
		cs := opts.ClusterSize
		if cs == 0 {
			cs = DefaultClusterSize
			if src.Info().Format == FormatQcow2 {
				cs = src.Info().ClusterSize
			}
		}
		if opts.Encrypt != nil && opts.Compress != "" {
			return fmt.Errorf("convert: %w: compressed clusters in an encrypted image", ErrUnsupported)
		}
		if err := CreateFile(dst, CreateOptions{Size: size, ClusterSize: cs, Compression: opts.Compress, Encrypt: opts.Encrypt}); err != nil {
			return err
		}
		var keys KeyFunc
		if opts.Encrypt != nil {
			keys = Keys(opts.Encrypt.Key)
		}
		// A new file removed on failure: one sync at the end is enough.
		img, err := Open(dst, OpenOptions{Format: FormatQcow2, NoBarriers: true, Keys: keys})
		if err != nil {
			os.Remove(dst)
			return err
		}
		w = img
	default:
		return fmt.Errorf("convert: %w: output format %q", ErrUnsupported, format)
	}
	defer func() {
		if cerr := w.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			os.Remove(dst)
		}
	}()

	q, _ := w.(*Qcow2)
	unit := int64(512)
	if q != nil {
		unit = q.cs
	}
	// Data ranges rounded out to whole output clusters, merged.
	var spans [][2]int64
	for _, e := range exts {
		if e.Zero {
			continue
		}
		s := e.Off / unit * unit
		t := min(size, (e.Off+e.Len+unit-1)/unit*unit)
		if n := len(spans); n > 0 && spans[n-1][1] >= s {
			spans[n-1][1] = max(spans[n-1][1], t)
			continue
		}
		spans = append(spans, [2]int64{s, t})
	}
	// One goroutine reads the next chunks while this one writes.
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	chunks := readChunks(ctx, src, spans)
	defer func() {
		cancel()
		for range chunks { // let the reader finish
		}
	}()
	var done int64
	for c := range chunks {
		if c.err != nil {
			return c.err
		}
		if q != nil && opts.Compress != "" {
			err = q.writeCompressedChunk(c.b, c.off)
		} else {
			err = writeNonZero(w, c.b, c.off, max(unit, 4096))
		}
		c.release()
		if err != nil {
			return fmt.Errorf("write %s at %d: %w", dst, c.off, err)
		}
		done += int64(len(c.b))
		if opts.Progress != nil {
			opts.Progress(done, size)
		}
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	if opts.Progress != nil {
		opts.Progress(size, size)
	}
	return w.Flush()
}

type chunk struct {
	b       []byte
	off     int64
	err     error
	release func()
}

// readChunks reads the spans in convertChunk pieces on its own goroutine, with
// up to three buffers in flight, and closes the channel when done or cancelled.
func readChunks(ctx context.Context, src Image, spans [][2]int64) <-chan chunk {
	const nbuf = 3
	free := make(chan []byte, nbuf)
	for range nbuf {
		free <- make([]byte, convertChunk)
	}
	out := make(chan chunk, nbuf-1)
	go func() {
		defer close(out)
		for _, sp := range spans {
			for off := sp[0]; off < sp[1]; {
				var buf []byte
				select {
				case buf = <-free:
				case <-ctx.Done():
					return
				}
				n := min(int64(len(buf)), sp[1]-off)
				b := buf[:n]
				c := chunk{b: b, off: off, release: func() { free <- buf }}
				if _, err := src.ReadAt(b, off); err != nil {
					c.err = fmt.Errorf("read %s at %d: %w", src.Info().Path, off, err)
				}
				select {
				case out <- c:
				case <-ctx.Done():
					return
				}
				if c.err != nil {
					return
				}
				off += n
			}
		}
	}()
	return out
}

// writeNonZero writes the runs of b (at guest offset off) whose units are not all
// zeros; zero units stay unallocated.
func writeNonZero(w Image, b []byte, off, unit int64) error {
	n := int64(len(b))
	for i := int64(0); i < n; {
		j := min(i+unit, n)
		if isZero(b[i:j]) {
			i = j
			continue
		}
		k := j
		for k < n {
			e := min(k+unit, n)
			if isZero(b[k:e]) {
				break
			}
			k = e
		}
		if _, err := w.WriteAt(b[i:k], off+i); err != nil {
			return err
		}
		i = k
	}
	return nil
}

// writeCompressedChunk compresses each non-zero cluster of b in parallel and
// writes them as compressed clusters (or plain ones that do not compress).
func (q *Qcow2) writeCompressedChunk(b []byte, off int64) error {
	if q.encrypted() {
		return fmt.Errorf("%w: compressed clusters in an encrypted image", ErrUnsupported)
	}
	n := (int64(len(b)) + q.cs - 1) / q.cs
	out := make([][]byte, n)
	errs := make([]error, n)
	var wg sync.WaitGroup
	workers := runtime.GOMAXPROCS(0)
	next := make(chan int64, n)
	for i := int64(0); i < n; i++ {
		next <- i
	}
	close(next)
	for range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range next {
				c := b[i*q.cs : min(int64(len(b)), (i+1)*q.cs)]
				if isZero(c) {
					continue
				}
				if int64(len(c)) < q.cs { // the short last cluster of the disk
					full := make([]byte, q.cs)
					copy(full, c)
					c = full
				}
				z, err := compress(q.h.compressionType, c)
				if err != nil && !errors.Is(err, errIncompressible) {
					errs[i] = err
				}
				out[i] = z
			}
		}()
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		return err
	}
	q.mu.Lock()
	defer q.mu.Unlock()
	for i := int64(0); i < n; i++ {
		c := b[i*q.cs : min(int64(len(b)), (i+1)*q.cs)]
		g := off + i*q.cs
		switch {
		case out[i] != nil:
			if err := q.writeCompressed(g>>q.cb, out[i]); err != nil {
				return err
			}
		case !isZero(c):
			if err := q.writeBatch(c, g); err != nil {
				return err
			}
		}
	}
	return nil
}

// writeCompressed stores compressed data z for guest cluster gc, packed byte by
// byte after the previous compressed cluster as QEMU does. Every host cluster the
// data touches gets one reference.
func (q *Qcow2) writeCompressed(gc int64, z []byte) error {
	if err := q.writable(); err != nil {
		return err
	}
	old, err := q.l2Entry(gc)
	if err != nil {
		return err
	}
	if err := q.ensureL2(gc, gc); err != nil {
		return err
	}
	L := int64(len(z))
	var o int64
	pos := q.compPos
	rem := int64(0)
	if pos > 0 && pos&(q.cs-1) != 0 {
		rem = q.cs - pos&(q.cs-1)
	}
	switch {
	case rem >= L:
		o = pos
		if err := q.addRefcount(pos>>q.cb, 1); err != nil {
			return err
		}
	case rem > 0:
		k := (L - rem + q.cs - 1) / q.cs
		s, err := q.allocClusters(k)
		if err != nil {
			return err
		}
		if s == (pos>>q.cb+1)<<q.cb {
			o = pos
			if err := q.addRefcount(pos>>q.cb, 1); err != nil {
				return err
			}
		} else {
			for ci := s >> q.cb; ci < s>>q.cb+k; ci++ {
				if err := q.setRefcount(ci, 0); err != nil {
					return err
				}
			}
			if o, err = q.allocClusters((L + q.cs - 1) / q.cs); err != nil {
				return err
			}
		}
	default:
		if o, err = q.allocClusters((L + q.cs - 1) / q.cs); err != nil {
			return err
		}
	}
	if err := q.commitRefs(); err != nil {
		return err
	}
	if err := q.barrier(); err != nil {
		return err
	}
	if _, err := q.f.WriteAt(z, o); err != nil {
		return fmt.Errorf("write compressed cluster at %#x: %w", o, err)
	}
	if end := o + L; end > q.fileSize {
		q.fileSize = end
	}
	if err := q.barrier(); err != nil {
		return err
	}
	shift := 62 - (q.cb - 8)
	extra := uint64((o+L-1)>>9 - o>>9)
	u := l2Update{q: q}
	if err := u.set(gc, oflagCompress|extra<<shift|uint64(o)); err != nil {
		return err
	}
	if err := u.write(); err != nil {
		return err
	}
	q.compPos = o + L
	if old != 0 {
		if err := q.barrier(); err != nil {
			return err
		}
		if err := q.release(old); err != nil {
			return err
		}
		return q.commitRefs()
	}
	return nil
}
