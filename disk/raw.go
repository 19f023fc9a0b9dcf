package disk

import (
	"errors"
	"fmt"
	"io"
	"os"
	"sync"

	"golang.org/x/sys/unix"
)

// Raw is a raw image: guest offset = host offset. It never has a backing file.
type Raw struct {
	mu       sync.RWMutex
	f        *os.File
	path     string
	size     int64
	readOnly bool
	closed   bool
}

var _ Image = (*Raw)(nil)

// Info describes the raw layer.
func (r *Raw) Info() Info {
	return Info{Path: r.path, Format: FormatRaw, Size: r.size, ClusterSize: 512, FileSize: r.size, ReadOnly: r.readOnly}
}

// Size is the file size.
func (r *Raw) Size() int64 { return r.size }

// Backing is always nil.
func (r *Raw) Backing() Image { return nil }

// ReadAt reads guest bytes.
func (r *Raw) ReadAt(p []byte, off int64) (int, error) {
	r.mu.RLock()
	defer r.mu.RUnlock()
	if r.closed {
		return 0, ErrClosed
	}
	if off < 0 {
		return 0, ErrOutOfRange
	}
	if off >= r.size {
		if len(p) == 0 {
			return 0, nil
		}
		return 0, io.EOF
	}
	want := len(p)
	if int64(len(p)) > r.size-off {
		p = p[:r.size-off]
	}
	n, err := r.f.ReadAt(p, off)
	if err != nil && !errors.Is(err, io.EOF) {
		return n, err
	}
	clear(p[n:])
	if len(p) < want {
		return len(p), io.EOF
	}
	return len(p), nil
}

func (r *Raw) check(off, n int64) error {
	switch {
	case r.closed:
		return ErrClosed
	case r.readOnly:
		return fmt.Errorf("%s: %w", r.path, ErrReadOnly)
	case off < 0 || n < 0 || off > r.size || n > r.size-off:
		return fmt.Errorf("range %d+%d of a %d-byte disk: %w", off, n, r.size, ErrOutOfRange)
	}
	return nil
}

// WriteAt writes guest bytes.
func (r *Raw) WriteAt(p []byte, off int64) (int, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if err := r.check(off, int64(len(p))); err != nil {
		return 0, err
	}
	return r.f.WriteAt(p, off)
}

// WriteZeroes punches a hole (or writes zeros where the file system cannot).
func (r *Raw) WriteZeroes(off, n int64) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if err := r.check(off, n); err != nil {
		return err
	}
	if n == 0 {
		return nil
	}
	err := unix.Fallocate(int(r.f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, n)
	if err == nil {
		return nil
	}
	z := make([]byte, min(n, 1<<20))
	for n > 0 {
		k := min(n, int64(len(z)))
		if _, err := r.f.WriteAt(z[:k], off); err != nil {
			return err
		}
		off += k
		n -= k
	}
	return nil
}

// Discard is WriteZeroes for raw images.
func (r *Raw) Discard(off, n int64) error { return r.WriteZeroes(off, n) }

// MapLayer reports data and holes (holes read as zeros).
func (r *Raw) MapLayer(off, n int64) ([]Extent, error) {
	r.mu.RLock()
	defer r.mu.RUnlock()
	if r.closed {
		return nil, ErrClosed
	}
	if off < 0 || n < 0 || off > r.size || n > r.size-off {
		return nil, ErrOutOfRange
	}
	end := off + n
	var exts []Extent
	fd := int(r.f.Fd())
	for pos := off; pos < end; {
		data, err := unix.Seek(fd, pos, unix.SEEK_DATA)
		if err != nil || data >= end {
			// ENXIO: no data after pos.
			exts = appendExtent(exts, Extent{Off: pos, Len: end - pos, State: Zero, HostOff: -1})
			break
		}
		if data > pos {
			exts = appendExtent(exts, Extent{Off: pos, Len: data - pos, State: Zero, HostOff: -1})
		}
		hole, err := unix.Seek(fd, data, unix.SEEK_HOLE)
		if err != nil || hole > end {
			hole = end
		}
		exts = appendExtent(exts, Extent{Off: data, Len: hole - data, State: Data, HostOff: data})
		pos = hole
	}
	return exts, nil
}

// Flush syncs the file.
func (r *Raw) Flush() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed {
		return ErrClosed
	}
	if r.readOnly {
		return nil
	}
	return r.f.Sync()
}

// Close closes the file.
func (r *Raw) Close() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed {
		return nil
	}
	r.closed = true
	return r.f.Close()
}
