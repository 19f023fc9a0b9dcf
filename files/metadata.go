package files

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"sort"

	"github.com/cvd-project/cvd/disk"
)

// Range is a byte range of the disk that holds file-system metadata.
type Range struct {
	Off  int64  `json:"offset"`
	Len  int64  `json:"length"`
	What string `json:"what"` // superblock, group descriptors, block bitmap, inode bitmap, inode table, journal
}

// End is one past the range's last byte.
func (r Range) End() int64 { return r.Off + r.Len }

// ext4 superblock fields and feature bits.
const (
	ext4Magic            = 0xef53
	compatHasJournal     = 0x4
	incompat64Bit        = 0x80
	incompatRecover      = 0x4
	incompatCsumSeed     = 0x2000
	roCompatMetadataCsum = 0x400
	incompatMetaBG       = 0x10
	roCompatSparse       = 0x1
	inodeExtentsFlag     = 0x80000
	inodeInlineDataFlag  = 0x10000000
	extentMagic          = 0xf30a
	maxExtentDepth       = 5
	maxGroupsMetadata    = 1 << 22
	// maxDescriptorBytes bounds the group descriptor table (64 TiB of 4 KiB
	// blocks with 64-byte descriptors needs 32 MiB).
	maxDescriptorBytes = 256 << 20
)

// Metadata lists the byte ranges of the disk img that hold ext4 metadata: each
// file system's superblock and its backups, group descriptors and the blocks
// reserved for their growth, block and inode bitmaps, inode tables, and the
// journal; and of a FAT32 file system, its boot sector, reserved sectors and
// tables (its directories are not placed). A disk with no ext4 file system gives ErrNoFileSystem; a layout
// this reader cannot place (meta_bg, a journal without extents) gives
// ErrUnsupportedFS; a malformed one ErrCorrupt.
func Metadata(ctx context.Context, img disk.Image) ([]Range, error) {
	st := newStorage(img)
	var out []Range
	found := false
	for _, reg := range regions(st) {
		start := reg.start
		rs, err := ext4Metadata(ctx, st, start, reg.size)
		if errors.Is(err, errNotExt4) {
			// A FAT32 file system: its boot sector, reserved sectors and FATs.
			if n, err := checkFAT32(st, start, reg.size); err == nil {
				found = true
				out = append(out, Range{Off: start, Len: n, What: "FAT boot sector and tables"})
			}
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("%s: file system at %d: %w", img.Info().Path, start, err)
		}
		found = true
		out = append(out, rs...)
	}
	if !found {
		return nil, fmt.Errorf("%s: %w", img.Info().Path, ErrNoFileSystem)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Off < out[j].Off })
	return out, nil
}

var errNotExt4 = errors.New("not ext4")

// ErrUnsupportedFS: an ext4 layout whose metadata this package does not place.
var ErrUnsupportedFS = errors.New("unsupported file-system layout")

// geometry is what an ext4 file system's superblock and group descriptors
// say about where things are.
type geometry struct {
	r                     io.ReaderAt
	start, bs, blocks     int64
	first, bpg, ipg       int64
	inodeSize, groups     int64
	gdtBlocks, reserved   int64
	itBlocks              int64
	compat, roCompat      uint32
	recover               bool   // the journal needs recovery (not cleanly unmounted)
	csum                  bool   // metadata_csum: inodes carry a crc32c
	csumSeed              uint32 // the checksum seed (from the UUID, or stored)
	journalIno            int64
	bitmaps, inodeBitmaps []int64
	tables                []int64
}

// readGeometry reads the ext4 file system at start (size bytes at most).
func readGeometry(ctx context.Context, r io.ReaderAt, start, size int64) (*geometry, error) {
	sb := make([]byte, 1024)
	if _, err := r.ReadAt(sb, start+1024); err != nil {
		return nil, errNotExt4
	}
	le := binary.LittleEndian
	if le.Uint16(sb[0x38:]) != ext4Magic {
		return nil, errNotExt4
	}
	logBS := le.Uint32(sb[0x18:])
	if logBS > 6 {
		return nil, fmt.Errorf("%w: block size 2^%d KiB", ErrCorrupt, logBS)
	}
	g := &geometry{r: r, start: start, bs: int64(1024) << logBS}
	bs := g.bs
	var incompat uint32
	g.compat, incompat, g.roCompat = le.Uint32(sb[0x5c:]), le.Uint32(sb[0x60:]), le.Uint32(sb[0x64:])
	g.blocks = int64(le.Uint32(sb[0x04:]))
	g.recover = incompat&incompatRecover != 0
	if g.csum = le.Uint32(sb[0x64:])&roCompatMetadataCsum != 0; g.csum {
		if incompat&incompatCsumSeed != 0 {
			g.csumSeed = le.Uint32(sb[0x270:])
		} else {
			g.csumSeed = crc32cRaw(0xffffffff, sb[0x68:0x78])
		}
	}
	descSize := int64(32)
	if incompat&incompat64Bit != 0 {
		g.blocks |= int64(le.Uint32(sb[0x150:])) << 32
		descSize = int64(le.Uint16(sb[0xfe:]))
		if descSize < 32 || descSize > 1024 || descSize&(descSize-1) != 0 {
			return nil, fmt.Errorf("%w: descriptor size %d", ErrCorrupt, descSize)
		}
	}
	if incompat&incompatMetaBG != 0 {
		return nil, fmt.Errorf("%w: meta_bg", ErrUnsupportedFS)
	}
	g.first = int64(le.Uint32(sb[0x14:]))
	g.bpg = int64(le.Uint32(sb[0x20:]))
	g.ipg = int64(le.Uint32(sb[0x28:]))
	g.inodeSize = int64(le.Uint16(sb[0x58:]))
	if g.bpg == 0 || g.ipg == 0 || g.inodeSize < 128 || g.inodeSize > bs || g.blocks <= g.first {
		return nil, fmt.Errorf("%w: superblock geometry", ErrCorrupt)
	}
	if g.blocks > size/bs {
		return nil, fmt.Errorf("%w: %d blocks of %d bytes do not fit in %d bytes", ErrCorrupt, g.blocks, bs, size)
	}
	g.groups = (g.blocks - g.first + g.bpg - 1) / g.bpg
	if g.groups > maxGroupsMetadata {
		return nil, fmt.Errorf("%w: %d block groups", ErrCorrupt, g.groups)
	}
	// go-diskfs allocates the descriptor table from these fields (and its own
	// count of groups, blocks/bpg + 1 at most): bound it.
	if gdt := descSize * (g.blocks/g.bpg + 1); gdt > maxDescriptorBytes || gdt > size {
		return nil, fmt.Errorf("%w: a %d-byte group descriptor table", ErrCorrupt, gdt)
	}
	g.gdtBlocks = (g.groups*descSize + bs - 1) / bs
	g.reserved = int64(le.Uint16(sb[0xce:]))
	g.journalIno = int64(le.Uint32(sb[0xe0:]))
	gdt := make([]byte, g.gdtBlocks*bs)
	if _, err := r.ReadAt(gdt, start+(g.first+1)*bs); err != nil {
		return nil, fmt.Errorf("read group descriptors: %w", err)
	}
	g.itBlocks = (g.ipg*g.inodeSize + bs - 1) / bs
	g.bitmaps, g.inodeBitmaps, g.tables = make([]int64, g.groups), make([]int64, g.groups), make([]int64, g.groups)
	for i := int64(0); i < g.groups; i++ {
		if i%4096 == 0 && ctx.Err() != nil {
			return nil, ctx.Err()
		}
		d := gdt[i*descSize:]
		bb, ib, it := int64(le.Uint32(d[0:])), int64(le.Uint32(d[4:])), int64(le.Uint32(d[8:]))
		if descSize >= 64 {
			bb |= int64(le.Uint32(d[0x20:])) << 32
			ib |= int64(le.Uint32(d[0x24:])) << 32
			it |= int64(le.Uint32(d[0x28:])) << 32
		}
		for _, b := range []int64{bb, ib, it} {
			if b < 0 || b >= g.blocks || (b == it && it+g.itBlocks > g.blocks) {
				return nil, fmt.Errorf("%w: group %d names block %d of %d", ErrCorrupt, i, b, g.blocks)
			}
		}
		g.bitmaps[i], g.inodeBitmaps[i], g.tables[i] = bb, ib, it
	}
	return g, nil
}

// inode reads inode number ino.
func (g *geometry) inode(ino int64) ([]byte, error) {
	off, err := g.inodeOff(ino)
	if err != nil {
		return nil, err
	}
	in := make([]byte, g.inodeSize)
	if _, err := g.r.ReadAt(in, off); err != nil {
		return nil, fmt.Errorf("read inode %d: %w", ino, err)
	}
	return in, nil
}

// inodeOff is where inode ino lies on the disk.
func (g *geometry) inodeOff(ino int64) (int64, error) {
	grp, idx := (ino-1)/g.ipg, (ino-1)%g.ipg
	if ino < 1 || grp >= g.groups {
		return 0, fmt.Errorf("%w: inode %d", ErrCorrupt, ino)
	}
	return g.start + g.tables[grp]*g.bs + idx*g.inodeSize, nil
}

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// crc32cRaw is the kernel's crc32c: no inversion before or after.
func crc32cRaw(crc uint32, p []byte) uint32 { return ^crc32.Update(^crc, castagnoli, p) }

// inodeChecksum is the metadata_csum checksum of inode ino (its bytes in
// raw, the checksum fields taken as zero), as the kernel computes it.
func (g *geometry) inodeChecksum(ino uint32, raw []byte) uint32 {
	le := binary.LittleEndian
	var b4 [4]byte
	le.PutUint32(b4[:], ino)
	c := crc32cRaw(g.csumSeed, b4[:])
	c = crc32cRaw(c, raw[0x64:0x68]) // i_generation
	zero := []byte{0, 0}
	c = crc32cRaw(c, raw[:0x7c])
	c = crc32cRaw(c, zero)
	c = crc32cRaw(c, raw[0x7e:128])
	if len(raw) > 128 {
		c = crc32cRaw(c, raw[128:0x82])
		off := 0x82
		if int(le.Uint16(raw[0x80:])) >= 4 {
			c = crc32cRaw(c, zero)
			off += 2
		}
		c = crc32cRaw(c, raw[off:])
	}
	return c
}

// setInodeChecksum stores inode ino's checksum in raw.
func (g *geometry) setInodeChecksum(ino uint32, raw []byte) {
	c := g.inodeChecksum(ino, raw)
	le := binary.LittleEndian
	le.PutUint16(raw[0x7c:], uint16(c))
	if len(raw) > 128 && int(le.Uint16(raw[0x80:])) >= 4 {
		le.PutUint16(raw[0x82:], uint16(c>>16))
	}
}

// storedInodeChecksum is the checksum raw carries.
func storedInodeChecksum(raw []byte) uint32 {
	le := binary.LittleEndian
	c := uint32(le.Uint16(raw[0x7c:]))
	if len(raw) > 128 && int(le.Uint16(raw[0x80:])) >= 4 {
		c |= uint32(le.Uint16(raw[0x82:])) << 16
	}
	return c
}

// fileExtents are the byte ranges of the disk that inode ino's data occupies,
// in the order of the file.
func (g *geometry) fileExtents(ino int64, what string) ([]Range, error) {
	in, err := g.inode(ino)
	if err != nil {
		return nil, err
	}
	m, err := g.extentMap(ino, in)
	if err != nil {
		return nil, err
	}
	ext := make([]Range, len(m))
	for i, e := range m {
		ext[i] = Range{Off: g.start + e.phys*g.bs, Len: e.blocks * g.bs, What: what}
	}
	return ext, nil
}

// mapped is one extent of a file: blocks from its logical block, at physical
// block phys; unwritten extents read as zeros.
type mapped struct {
	logical, phys, blocks int64
	unwritten             bool
}

// extentMap reads the extent tree of inode ino (raw: its bytes).
func (g *geometry) extentMap(ino int64, raw []byte) ([]mapped, error) {
	if binary.LittleEndian.Uint32(raw[0x20:])&inodeExtentsFlag == 0 {
		return nil, fmt.Errorf("%w: inode %d has no extent tree", ErrUnsupportedFS, ino)
	}
	var m []mapped
	budget := g.blocks // a valid tree has no more nodes than the file system blocks
	if err := extents(g.r, g.start, g.bs, g.blocks, raw[0x28:0x28+60], 0, &m, &budget); err != nil {
		return nil, err
	}
	var covered int64
	for _, e := range m {
		covered += e.blocks
	}
	if covered > g.blocks {
		return nil, fmt.Errorf("%w: inode %d maps %d blocks of %d", ErrCorrupt, ino, covered, g.blocks)
	}
	return m, nil
}

func ext4Metadata(ctx context.Context, r io.ReaderAt, start, size int64) ([]Range, error) {
	g, err := readGeometry(ctx, r, start, size)
	if err != nil {
		return nil, err
	}
	bs := g.bs
	var out []Range
	add := func(block, n int64, what string) {
		if n > 0 {
			out = append(out, Range{Off: start + block*bs, Len: n * bs, What: what})
		}
	}
	// The superblock itself lives at byte 1024 of block 0 (block 1 when
	// blocks are 1 KiB).
	out = append(out, Range{Off: start + 1024, Len: 1024, What: "superblock"})
	for i := int64(0); i < g.groups; i++ {
		if !hasSuperBackup(i, g.roCompat&roCompatSparse != 0) {
			continue
		}
		b := g.first + i*g.bpg
		if i > 0 {
			add(b, 1, "superblock")
		}
		add(b+1, g.gdtBlocks, "group descriptors")
		add(b+1+g.gdtBlocks, g.reserved, "reserved group descriptors")
	}
	for i := int64(0); i < g.groups; i++ {
		add(g.bitmaps[i], 1, "block bitmap")
		add(g.inodeBitmaps[i], 1, "inode bitmap")
		add(g.tables[i], g.itBlocks, "inode table")
	}
	if g.compat&compatHasJournal != 0 && g.journalIno > 0 {
		ext, err := g.fileExtents(g.journalIno, "journal")
		if err != nil {
			return nil, fmt.Errorf("journal: %w", err)
		}
		out = append(out, ext...)
	}
	return out, nil
}

// extents adds the blocks an extent tree node maps.
func extents(r io.ReaderAt, start, bs, blocks int64, node []byte, depth int, out *[]mapped, budget *int64) error {
	le := binary.LittleEndian
	if *budget--; *budget < 0 {
		return fmt.Errorf("%w: an extent tree larger than the file system", ErrCorrupt)
	}
	if len(node) < 12 || le.Uint16(node) != extentMagic {
		return fmt.Errorf("%w: extent header", ErrCorrupt)
	}
	n, d := int(le.Uint16(node[2:])), int(le.Uint16(node[6:]))
	if depth > maxExtentDepth || d > maxExtentDepth || 12+n*12 > len(node) {
		return fmt.Errorf("%w: extent node (%d entries, depth %d)", ErrCorrupt, n, d)
	}
	for i := 0; i < n; i++ {
		e := node[12+i*12:]
		if d == 0 {
			l := int64(le.Uint16(e[4:]))
			unwritten := l > 32768
			if unwritten {
				l -= 32768
			}
			b := int64(le.Uint16(e[6:]))<<32 | int64(le.Uint32(e[8:]))
			if b+l > blocks {
				return fmt.Errorf("%w: extent past the end", ErrCorrupt)
			}
			if int64(len(*out)) >= blocks {
				return fmt.Errorf("%w: more extents than blocks", ErrCorrupt)
			}
			*out = append(*out, mapped{logical: int64(le.Uint32(e[0:])), phys: b, blocks: l, unwritten: unwritten})
			continue
		}
		leaf := int64(le.Uint16(e[8:]))<<32 | int64(le.Uint32(e[4:]))
		if leaf >= blocks {
			return fmt.Errorf("%w: extent index past the end", ErrCorrupt)
		}
		child := make([]byte, bs)
		if _, err := r.ReadAt(child, start+leaf*bs); err != nil {
			return err
		}
		if err := extents(r, start, bs, blocks, child, depth+1, out, budget); err != nil {
			return err
		}
	}
	return nil
}

// hasSuperBackup: group g holds a superblock copy (all groups without
// sparse_super; else 0, 1 and the powers of 3, 5 and 7).
func hasSuperBackup(g int64, sparse bool) bool {
	if !sparse || g <= 1 {
		return true
	}
	for _, p := range []int64{3, 5, 7} {
		x := p
		for x < g {
			x *= p
		}
		if x == g {
			return true
		}
	}
	return false
}
