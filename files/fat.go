package files

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"sort"

	"github.com/diskfs/go-diskfs/filesystem/fat32"
)

// FAT32, read for EFI system partitions. go-diskfs sizes its FAT buffers
// from the boot sector unchecked, so cvd checks the boot sector first.

var errNotFAT = errors.New("not FAT32")

// maxFATBytes bounds one FAT (64 MiB: a 64 GiB file system of 4 KiB clusters).
const maxFATBytes = 64 << 20

// checkFAT32 reads the boot sector at start and says whether it is a FAT32
// one whose tables fit the region and the bound; n is the bytes its boot
// sector, reserved sectors and FATs span.
func checkFAT32(st *storage, start, size int64) (n int64, err error) {
	b := make([]byte, 512)
	if _, err := st.ReadAt(b, start); err != nil {
		return 0, errNotFAT
	}
	le := binary.LittleEndian
	bps := int64(le.Uint16(b[11:]))
	spc := int64(b[13])
	reserved := int64(le.Uint16(b[14:]))
	fats := int64(b[16])
	spf := int64(le.Uint32(b[36:]))
	total := int64(le.Uint32(b[32:]))
	if le.Uint16(b[510:]) != 0xaa55 || string(b[82:87]) != "FAT32" || le.Uint16(b[22:]) != 0 {
		return 0, errNotFAT
	}
	switch {
	case bps != 512 && bps != 1024 && bps != 2048 && bps != 4096,
		spc == 0 || spc&(spc-1) != 0, reserved == 0, fats == 0 || fats > 2, spf == 0:
		return 0, fmt.Errorf("%w: FAT32 boot sector geometry", ErrCorrupt)
	}
	if spf*bps > maxFATBytes || (reserved+fats*spf)*bps > size || total*bps > size {
		return 0, fmt.Errorf("%w: FAT32 tables of %d bytes (%d sectors in all) in a %d-byte region", ErrCorrupt, spf*bps, total, size)
	}
	return (reserved + fats*spf) * bps, nil
}

// fatManifest lists the FAT32 file system of region r (errNotFAT when there
// is none). FAT keeps no owner and no permissions: every entry is 0755 and
// owned by 0, as Linux shows it mounted with the default masks.
func fatManifest(ctx context.Context, st *storage, r region) (*FileSystem, error) {
	if _, err := checkFAT32(st, r.start, r.size); err != nil {
		return nil, err
	}
	fsys, err := fat32.Read(st, r.size, r.start, 512)
	if err != nil {
		return nil, fmt.Errorf("%w: FAT32: %v", ErrCorrupt, err)
	}
	m := &FileSystem{Partition: r.n, Type: "vfat", Label: fsys.Label(), Start: r.start, Size: r.size}
	w := walker{fsys: fsys, seen: map[uint32]bool{}, maxSize: r.size}
	if err := w.walk(ctx, "/", 0, &m.Files); err != nil {
		return nil, err
	}
	for i := range m.Files {
		// As Linux shows a FAT file system mounted with its default masks.
		m.Files[i].Mode = "0755"
	}
	sort.Slice(m.Files, func(i, j int) bool { return m.Files[i].Path < m.Files[j].Path })
	return m, nil
}
