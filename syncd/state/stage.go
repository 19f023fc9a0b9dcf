package state

import (
	"fmt"
	"sync"
	"syscall"

	"github.com/cvd-project/cvd/disk"
	"github.com/cvd-project/cvd/syncd/proto"
)

// StageWriter writes verified clusters into a layer, joining neighbours into
// batches that a goroutine of its own writes while the next ones are decoded.
type StageWriter struct {
	img  disk.Image
	cs   int64
	buf  []byte
	off  int64
	Err  error
	done bool

	q    chan stageBatch
	wg   sync.WaitGroup
	mu   sync.Mutex
	werr error
}

type stageBatch struct {
	off int64
	b   []byte
}

const (
	stageBatchSize  = 8 << 20
	stageBatchDepth = 2
)

// stageBufs keeps the batch buffers of stage writers from one upload to the next
// (each is written through O_DIRECT: page-aligned, as large allocations are).
var stageBufs = proto.NewBufPool(2*(stageBatchDepth+2), stageBatchSize)

func (w *StageWriter) start() {
	w.q = make(chan stageBatch, stageBatchDepth)
	w.wg.Add(1)
	go func() {
		defer w.wg.Done()
		for b := range w.q {
			if w.asyncErr() == nil {
				if _, err := w.img.WriteAt(b.b, b.off); err != nil {
					w.mu.Lock()
					w.werr = proto.NoSpace(fmt.Errorf("write at %#x: %w", b.off, err))
					w.mu.Unlock()
				}
			}
			stageBufs.Put(b.b)
		}
	}()
}

func (w *StageWriter) asyncErr() error {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.werr
}

func (w *StageWriter) Write(idx int64, raw []byte) error {
	if w.Err != nil {
		return w.Err
	}
	if err := w.asyncErr(); err != nil {
		w.Err = err
		return err
	}
	off := idx * w.cs
	if len(w.buf) > 0 && (w.off+int64(len(w.buf)) != off || len(w.buf)+len(raw) > stageBatchSize) {
		w.flushBuf()
	}
	if w.buf == nil {
		w.buf = stageBufs.Get(0)
	}
	if len(w.buf) == 0 {
		w.off = off
	}
	w.buf = append(w.buf, raw...)
	return w.Err
}

// flushBuf hands the current batch to the writer goroutine (or writes it).
func (w *StageWriter) flushBuf() {
	if len(w.buf) == 0 || w.Err != nil {
		w.buf = w.buf[:0]
		return
	}
	if w.q == nil {
		w.start()
	}
	w.q <- stageBatch{off: w.off, b: w.buf}
	w.buf = stageBufs.Get(0)
}

// Wait lets every handed batch reach the image.
func (w *StageWriter) Wait() error {
	if w.q != nil {
		close(w.q)
		w.wg.Wait()
		w.q = nil
	}
	if len(w.buf) == 0 && w.buf != nil {
		stageBufs.Put(w.buf)
		w.buf = nil
	}
	if err := w.asyncErr(); err != nil && w.Err == nil {
		w.Err = err
	}
	return w.Err
}

// Sync writes everything handed so far and waits for it (no flush of the image).
func (w *StageWriter) Sync() error {
	w.flushBuf()
	return w.Wait()
}

func (w *StageWriter) Flush() error {
	if err := w.Sync(); err != nil {
		return err
	}
	if err := w.img.Flush(); err != nil {
		w.Err = proto.NoSpace(err)
	}
	return w.Err
}

func (w *StageWriter) Close() {
	w.Wait()
	if !w.done {
		w.done = true
		w.img.Close()
	}
}

// CheckFree refuses when the file system of dir has less than need bytes free.
func CheckFree(dir string, need int64) error {
	var fs syscall.Statfs_t
	if err := syscall.Statfs(dir, &fs); err != nil {
		return nil // cannot tell; the writes will say
	}
	free := int64(fs.Bavail) * int64(fs.Bsize)
	if free < need {
		return fmt.Errorf("%w: %s has %d MiB free, this needs %d MiB", proto.ErrNoSpace, dir, free>>20, need>>20)
	}
	return nil
}

// ClustersOf is how many clusters of cs bytes a disk of size bytes has.
func ClustersOf(size int64, cs int) int64 { return (size + int64(cs) - 1) / int64(cs) }

// NewStageWriter writes clusters of cs bytes into img (which it closes).
func NewStageWriter(img disk.Image, cs int64) *StageWriter { return &StageWriter{img: img, cs: cs} }
