package clone

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"time"

	"github.com/cvd-project/cvd/internal/proc"
	"github.com/diskfs/go-diskfs/backend"
	"github.com/diskfs/go-diskfs/filesystem/iso9660"
)

// SeedLabel is the volume label cloud-init's NoCloud datasource looks for.
const SeedLabel = "cidata"

// SeedFiles returns the NoCloud meta-data and user-data of an identity.
func SeedFiles(id Identity) (metaData, userData []byte) {
	metaData = fmt.Appendf(nil, "instance-id: %s\nlocal-hostname: %s\n", id.UUID, id.Hostname)
	userData = fmt.Appendf(nil, "#cloud-config\nhostname: %s\npreserve_hostname: false\n", id.Hostname)
	return metaData, userData
}

// BuildSeed returns a cloud-init NoCloud seed image: ISO 9660 with Rock Ridge and
// Joliet names, volume label "cidata", files meta-data and user-data, padded to
// the volume size its primary volume descriptor declares. go-diskfs builds it in
// memory; workDir is where it stages the two files (in a fresh directory that is
// removed before BuildSeed returns).
func BuildSeed(workDir string, id Identity) ([]byte, error) {
	ws, err := os.MkdirTemp(workDir, proc.TempPrefix()+"seed-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(ws)
	m := &memStorage{}
	fsys, err := iso9660.Create(m, 0, 0, 2048, ws)
	if err != nil {
		return nil, err
	}
	meta, user := SeedFiles(id)
	for _, e := range []struct {
		name string
		data []byte
	}{{"/meta-data", meta}, {"/user-data", user}} {
		w, err := fsys.OpenFile(e.name, os.O_CREATE|os.O_RDWR)
		if err != nil {
			return nil, err
		}
		_, err = w.Write(e.data)
		if err2 := w.Close(); err == nil {
			err = err2
		}
		if err != nil {
			return nil, fmt.Errorf("%s: %w", e.name, err)
		}
	}
	if err := fsys.Finalize(iso9660.FinalizeOptions{RockRidge: true, Joliet: true, VolumeIdentifier: SeedLabel}); err != nil {
		return nil, err
	}
	// go-diskfs ends the image after the last byte of the last file; a loop device
	// sees whole 512-byte sectors only, so pad to the volume size the primary
	// volume descriptor declares (whole 2048-byte blocks).
	const pvd = 16 * 2048
	if len(m.b) < pvd+84 {
		return nil, errors.New("seed image: no primary volume descriptor")
	}
	if want := int(binary.LittleEndian.Uint32(m.b[pvd+80:])) * 2048; len(m.b) < want {
		m.b = append(m.b, make([]byte, want-len(m.b))...)
	}
	return m.b, nil
}

// WriteSeed writes the seed image of BuildSeed at path, which must not exist. The
// system area (the first 32 KiB, all zeros) is left as a hole. The file is not
// synced.
func WriteSeed(path, workDir string, id Identity) (err error) {
	b, err := BuildSeed(workDir, id)
	if err != nil {
		return fmt.Errorf("seed image %s: %w", filepath.Base(path), err)
	}
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o644)
	if err != nil {
		return err
	}
	const systemArea = 16 * 2048
	if _, err = f.WriteAt(b[systemArea:], systemArea); err == nil {
		err = f.Truncate(int64(len(b)))
	}
	if err2 := f.Close(); err == nil {
		err = err2
	}
	if err != nil {
		os.Remove(path)
		return fmt.Errorf("seed image %s: %w", filepath.Base(path), err)
	}
	return nil
}

// memStorage is a go-diskfs backend held in memory.
type memStorage struct {
	b   []byte
	off int64
}

var _ backend.Storage = (*memStorage)(nil)

func (m *memStorage) Stat() (fs.FileInfo, error) { return memInfo{int64(len(m.b))}, nil }
func (m *memStorage) Read(p []byte) (int, error) {
	n, err := m.ReadAt(p, m.off)
	m.off += int64(n)
	return n, err
}
func (m *memStorage) Close() error { return nil }
func (m *memStorage) ReadAt(p []byte, off int64) (int, error) {
	if off >= int64(len(m.b)) {
		return 0, io.EOF
	}
	n := copy(p, m.b[off:])
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}
func (m *memStorage) WriteAt(p []byte, off int64) (int, error) {
	if end := off + int64(len(p)); end > int64(len(m.b)) {
		if end > int64(cap(m.b)) {
			nb := make([]byte, end, max(end, 2*int64(cap(m.b)), 64<<10))
			copy(nb, m.b)
			m.b = nb
		} else {
			m.b = m.b[:end]
		}
	}
	return copy(m.b[off:], p), nil
}
func (m *memStorage) Seek(off int64, whence int) (int64, error) {
	switch whence {
	case io.SeekStart:
	case io.SeekCurrent:
		off += m.off
	case io.SeekEnd:
		off += int64(len(m.b))
	}
	if off < 0 {
		return 0, errors.New("seek before start")
	}
	m.off = off
	return off, nil
}
func (m *memStorage) Sys() (*os.File, error)                  { return nil, backend.ErrNotSuitable }
func (m *memStorage) Writable() (backend.WritableFile, error) { return m, nil }
func (m *memStorage) Path() string                            { return "" }

type memInfo struct{ size int64 }

func (i memInfo) Name() string       { return "seed.iso" }
func (i memInfo) Size() int64        { return i.size }
func (i memInfo) Mode() fs.FileMode  { return 0o644 }
func (i memInfo) ModTime() time.Time { return time.Time{} }
func (i memInfo) IsDir() bool        { return false }
func (i memInfo) Sys() any           { return nil }
