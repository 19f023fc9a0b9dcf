package files

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"

	"github.com/diskfs/go-diskfs/filesystem/ext4"

	"github.com/cvd-project/cvd/disk"
)

// ErrNotFound: the path is in no file system of the disk.
var ErrNotFound = errors.New("file not found")

// Location is where a regular file's bytes lie on a disk: its content is
// the Len bytes at Off (one extent), so that writing Len bytes there
// changes the file and nothing else of the file system.
type Location struct {
	Off     int64  `json:"offset"`
	Len     int64  `json:"length"`
	Content []byte `json:"-"`
	// Room is what the extent holds (whole blocks): content up to Room bytes
	// can be rewritten in place (Rewrite).
	Room  int64 `json:"room"`
	inode *inodeRef
}

// inodeRef is a located file's inode: where it lies and its bytes, and the
// file system's checksum scheme.
type inodeRef struct {
	ino uint32
	off int64
	raw []byte
	g   *geometry
}

// Write is bytes to write at an offset of the disk.
type Write struct {
	Off  int64
	Data []byte
}

// Rewrite gives the writes that make the located file hold content instead:
// the data in its extent (content, zero-padded over the old length) and,
// when the length changes, its inode with the new size and, on a
// metadata_csum file system, the new checksum. Content longer than Room, or
// an inode whose stored checksum cvd does not reproduce, is
// ErrUnsupportedFS: nothing is written then.
func (l *Location) Rewrite(content []byte) ([]Write, error) {
	if int64(len(content)) > l.Room {
		return nil, fmt.Errorf("%w: %d bytes do not fit the file's %d-byte extent", ErrUnsupportedFS, len(content), l.Room)
	}
	data := make([]byte, max(int64(len(content)), l.Len))
	copy(data, content)
	ws := []Write{{Off: l.Off, Data: data}}
	if int64(len(content)) == l.Len {
		return ws, nil
	}
	in := l.inode
	if in == nil {
		return nil, fmt.Errorf("%w: no inode located", ErrUnsupportedFS)
	}
	raw := append([]byte{}, in.raw...)
	if in.g.csum && in.g.inodeChecksum(in.ino, raw) != storedInodeChecksum(raw) {
		return nil, fmt.Errorf("%w: inode %d's checksum is not the one cvd computes", ErrUnsupportedFS, in.ino)
	}
	le := binary.LittleEndian
	le.PutUint32(raw[0x4:], uint32(len(content)))
	le.PutUint32(raw[0x6c:], 0) // i_size_high
	if in.g.csum {
		in.g.setInodeChecksum(in.ino, raw)
	}
	return append(ws, Write{Off: in.off, Data: raw}), nil
}

// Locate finds the regular file at path in the first ext4 file system of img
// that has it, and where its bytes lie. A file not stored in one extent
// (fragmented, inline, empty) gives ErrUnsupportedFS.
func Locate(ctx context.Context, img disk.Image, path string) (loc *Location, err error) {
	defer func() {
		if p := recover(); p != nil {
			loc, err = nil, fmt.Errorf("%s: %w: %v", img.Info().Path, ErrCorrupt, p)
		}
	}()
	st := newStorage(img)
	for _, reg := range regions(st) {
		if _, err := readGeometry(ctx, st, reg.start, reg.size); err != nil {
			continue // not ext4, or one go-diskfs must not be given
		}
		fsys, err := ext4.Read(st, reg.size, reg.start, 512)
		if err != nil {
			continue
		}
		fi, err := fsys.Stat(fsPath(path))
		if err != nil {
			continue
		}
		if !fi.Mode().IsRegular() {
			return nil, fmt.Errorf("%s is not a regular file", path)
		}
		sys, ok := fi.Sys().(*ext4.StatT)
		if !ok || sys == nil {
			return nil, fmt.Errorf("%s: no inode", path)
		}
		if fi.Size() == 0 {
			return nil, fmt.Errorf("%w: %s is empty", ErrUnsupportedFS, path)
		}
		g, err := readGeometry(ctx, st, reg.start, reg.size)
		if err != nil {
			return nil, err
		}
		ext, err := g.fileExtents(int64(sys.Ino), path)
		if err != nil {
			return nil, err
		}
		if len(ext) != 1 || ext[0].Len < fi.Size() {
			return nil, fmt.Errorf("%w: %s is not stored in one extent", ErrUnsupportedFS, path)
		}
		f, err := fsys.OpenFile(fsPath(path), os.O_RDONLY)
		if err != nil {
			return nil, err
		}
		defer f.Close()
		content, err := io.ReadAll(io.LimitReader(f, 1<<20))
		if err != nil {
			return nil, err
		}
		// The bytes at the extent must be the file's: what the write will replace.
		on := make([]byte, fi.Size())
		if err := disk.ReadView(img, on, ext[0].Off); err != nil {
			return nil, err
		}
		if string(on) != string(content) {
			return nil, fmt.Errorf("%w: %s's extent does not hold its content", ErrCorrupt, path)
		}
		raw, err := g.inode(int64(sys.Ino))
		if err != nil {
			return nil, err
		}
		ioff, _ := g.inodeOff(int64(sys.Ino))
		return &Location{Off: ext[0].Off, Len: fi.Size(), Content: content, Room: ext[0].Len,
			inode: &inodeRef{ino: sys.Ino, off: ioff, raw: raw, g: g}}, nil
	}
	return nil, fmt.Errorf("%s: %s: %w", img.Info().Path, path, ErrNotFound)
}
