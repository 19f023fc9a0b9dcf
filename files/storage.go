package files

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"time"

	"github.com/diskfs/go-diskfs/backend"
	"github.com/diskfs/go-diskfs/partition"

	"github.com/cvd-project/cvd/disk"
)

// storage is a read-only go-diskfs backend over the guest view of a chain.
type storage struct {
	img disk.Image
	off int64
}

var _ backend.Storage = (*storage)(nil)

func newStorage(img disk.Image) *storage { return &storage{img: img} }

func (s *storage) ReadAt(p []byte, off int64) (int, error) {
	if off >= s.img.Size() {
		return 0, io.EOF
	}
	n := min(int64(len(p)), s.img.Size()-off)
	if err := disk.ReadView(s.img, p[:n], off); err != nil {
		return 0, err
	}
	if n < int64(len(p)) {
		return int(n), io.EOF
	}
	return len(p), nil
}

func (s *storage) Read(p []byte) (int, error) {
	n, err := s.ReadAt(p, s.off)
	s.off += int64(n)
	return n, err
}

func (s *storage) Seek(off int64, whence int) (int64, error) {
	switch whence {
	case io.SeekStart:
	case io.SeekCurrent:
		off += s.off
	case io.SeekEnd:
		off += s.img.Size()
	default:
		return 0, fmt.Errorf("seek: whence %d", whence)
	}
	if off < 0 {
		return 0, errors.New("seek before the start")
	}
	s.off = off
	return off, nil
}

func (s *storage) Stat() (fs.FileInfo, error) { return storageInfo{s.img}, nil }
func (s *storage) Close() error               { return nil }
func (s *storage) Sys() (*os.File, error)     { return nil, backend.ErrNotSuitable }
func (s *storage) Path() string               { return s.img.Info().Path }

// Writable refuses: the chain is read, never written.
func (s *storage) Writable() (backend.WritableFile, error) { return nil, backend.ErrIncorrectOpenMode }

type storageInfo struct{ img disk.Image }

func (i storageInfo) Name() string       { return i.img.Info().Path }
func (i storageInfo) Size() int64        { return i.img.Size() }
func (i storageInfo) Mode() fs.FileMode  { return 0o444 }
func (i storageInfo) ModTime() time.Time { return time.Time{} }
func (i storageInfo) IsDir() bool        { return false }
func (i storageInfo) Sys() any           { return nil }

// regions are where file systems may start on the disk: each partition of its
// GPT or MBR table (start and size in bytes, clipped to the disk), or the
// whole disk when it has no table (partition 0).
func regions(st *storage) []region {
	size := st.img.Size()
	// A FAT boot sector ends in 0x55aa too, which the MBR reader would take
	// for a partition table: a disk that starts with one is a whole-disk file
	// system.
	b := make([]byte, 512)
	if _, err := st.ReadAt(b, 0); err == nil && (string(b[82:87]) == "FAT32" || string(b[54:57]) == "FAT") {
		return []region{{0, 0, size}}
	}
	tbl, err := partition.Read(st, 512, 512)
	if err != nil || tbl == nil {
		return []region{{0, 0, size}}
	}
	var out []region
	for i, p := range tbl.GetPartitions() {
		if p.GetSize() > 0 && p.GetStart() >= 0 && p.GetStart() < size {
			out = append(out, region{i + 1, p.GetStart(), min(p.GetSize(), size-p.GetStart())})
		}
	}
	return out
}

// region is a partition (n from 1) or the whole disk (n 0).
type region struct {
	n           int
	start, size int64
}
