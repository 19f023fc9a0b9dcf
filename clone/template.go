package clone

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"

	"github.com/cvd-project/cvd/disk"
	"github.com/cvd-project/cvd/internal/proc"
	"golang.org/x/sys/unix"
)

// Template holds the bytes of a fresh qcow2 overlay, made once by disk.CreateFile,
// so that many identical overlays (same backing file name, seen from the same
// directory, same size) are written without opening the backing chain again. Only
// the non-zero blocks are written; the rest of the file is a hole.
type Template struct {
	size int64
	segs []segment
}

type segment struct {
	off  int64
	data []byte
}

const templateBlock = 4096

// NewTemplate writes an overlay with disk.CreateFile in dir (under a temporary
// name, removed afterwards) and keeps its bytes. Files written from it must live in
// dir too: a relative backing file name is only right from there.
func NewTemplate(dir string, co disk.CreateOptions) (*Template, error) {
	f, err := os.CreateTemp(dir, proc.TempPrefix()+"template-*.qcow2")
	if err != nil {
		return nil, err
	}
	p := f.Name()
	f.Close()
	os.Remove(p)
	defer os.Remove(p)
	if err := disk.CreateFile(p, co); err != nil {
		return nil, fmt.Errorf("template overlay: %w", err)
	}
	b, err := os.ReadFile(p)
	if err != nil {
		return nil, err
	}
	t := &Template{size: int64(len(b))}
	zero := make([]byte, templateBlock)
	for off := 0; off < len(b); off += templateBlock {
		end := min(off+templateBlock, len(b))
		if bytes.Equal(b[off:end], zero[:end-off]) {
			continue
		}
		if k := len(t.segs) - 1; k >= 0 && t.segs[k].off+int64(len(t.segs[k].data)) == int64(off) {
			t.segs[k].data = b[t.segs[k].off:end]
			continue
		}
		t.segs = append(t.segs, segment{int64(off), b[off:end]})
	}
	return t, nil
}

// Size is the file size of each overlay.
func (t *Template) Size() int64 { return t.size }

// Write writes the overlay at path, which must not exist. With sync, the file is
// fsynced before Write returns. It uses plain system calls: an os.File would
// register the descriptor with the runtime poller, three more calls per clone.
func (t *Template) Write(path string, sync bool) (err error) {
	fd, err := unix.Open(path, unix.O_WRONLY|unix.O_CREAT|unix.O_EXCL|unix.O_CLOEXEC, 0o644)
	if err != nil {
		return fmt.Errorf("write %s: %w", filepath.Base(path), &os.PathError{Op: "open", Path: path, Err: err})
	}
	defer func() {
		if err2 := unix.Close(fd); err == nil && err2 != nil {
			err = err2
		}
		if err != nil {
			os.Remove(path)
			err = fmt.Errorf("write %s: %w", filepath.Base(path), err)
		}
	}()
	for _, s := range t.segs {
		for b, off := s.data, s.off; len(b) > 0; {
			n, err := unix.Pwrite(fd, b, off)
			if err != nil {
				return err
			}
			b, off = b[n:], off+int64(n)
		}
	}
	if err := unix.Ftruncate(fd, t.size); err != nil {
		return err
	}
	if sync {
		return unix.Fsync(fd)
	}
	return nil
}
