package disk

import (
	"encoding/binary"
	"fmt"
)

const refTableOffsetMask = 0xfffffffffffffe00

// dirtyBlock is a refcount block with changes not yet written. Dirty blocks are
// pinned here (not only in the cache) until commitRefs writes them.
type dirtyBlock struct {
	buf    []byte
	lo, hi int  // byte range changed
	isNew  bool // write it whole
}

// pending holds refcount changes between allocation and commitRefs.
type pending struct {
	blocks       map[int64]*dirtyBlock
	rtLo, rtHi   int64 // refcount table entries changed, [lo, hi)
	rtDirty      bool
	newestBlocks []int64
}

func (q *Qcow2) pend() *pending {
	if q.pendingRefs == nil {
		q.pendingRefs = &pending{blocks: map[int64]*dirtyBlock{}}
	}
	return q.pendingRefs
}

func (q *Qcow2) maxRefcount() uint64 {
	if q.refBits == 64 {
		return ^uint64(0)
	}
	return 1<<q.refBits - 1
}

// rcGet reads entry i of a refcount block.
func (q *Qcow2) rcGet(blk []byte, i int64) uint64 {
	switch q.refBits {
	case 1, 2, 4:
		per := 8 / int64(q.refBits)
		b := blk[i/per]
		shift := uint(i%per) * q.refBits
		return uint64(b>>shift) & (1<<q.refBits - 1)
	case 8:
		return uint64(blk[i])
	case 16:
		return uint64(binary.BigEndian.Uint16(blk[i*2:]))
	case 32:
		return uint64(binary.BigEndian.Uint32(blk[i*4:]))
	default:
		return binary.BigEndian.Uint64(blk[i*8:])
	}
}

// rcSet writes entry i of a refcount block and returns the byte index touched.
func (q *Qcow2) rcSet(blk []byte, i int64, v uint64) int {
	switch q.refBits {
	case 1, 2, 4:
		per := 8 / int64(q.refBits)
		shift := uint(i%per) * q.refBits
		mask := byte(1<<q.refBits-1) << shift
		blk[i/per] = blk[i/per]&^mask | byte(v)<<shift&mask
		return int(i / per)
	case 8:
		blk[i] = byte(v)
		return int(i)
	case 16:
		binary.BigEndian.PutUint16(blk[i*2:], uint16(v))
		return int(i * 2)
	case 32:
		binary.BigEndian.PutUint32(blk[i*4:], uint32(v))
		return int(i * 4)
	default:
		binary.BigEndian.PutUint64(blk[i*8:], v)
		return int(i * 8)
	}
}

func (q *Qcow2) rcEntryBytes() int { return max(1, int(q.refBits)/8) }

// refBlock returns the refcount block of table index ti, or nil when there is none.
func (q *Qcow2) refBlock(ti int64) ([]byte, int64, error) {
	if ti >= int64(len(q.refTable)) {
		return nil, 0, nil
	}
	off := int64(q.refTable[ti] & refTableOffsetMask)
	if off == 0 {
		return nil, 0, nil
	}
	if p := q.pendingRefs; p != nil {
		if d, ok := p.blocks[off]; ok {
			return d.buf, off, nil
		}
	}
	if off < 0 || off%q.cs != 0 || off >= q.fileSize {
		return nil, 0, formatErr(int64(q.h.refTableOffset)+ti*8, "refcount table entry", "block offset %#x unaligned or past the end of the file", off)
	}
	if b := q.rbCache.get(off); b != nil {
		return b, off, nil
	}
	b := make([]byte, q.cs)
	if _, err := q.f.ReadAt(b, off); err != nil {
		return nil, 0, fmt.Errorf("read refcount block at %#x: %w", off, err)
	}
	return q.rbCache.put(off, b), off, nil
}

// refcount of host cluster ci.
func (q *Qcow2) refcount(ci int64) (uint64, error) {
	blk, _, err := q.refBlock(ci >> q.rpbBits)
	if err != nil || blk == nil {
		return 0, err
	}
	return q.rcGet(blk, ci&(1<<q.rpbBits-1)), nil
}

func (q *Qcow2) endCluster() int64 { return (q.fileSize + q.cs - 1) >> q.cb }

// markDirty pins block buf at off and records the changed byte.
func (q *Qcow2) markDirty(off int64, buf []byte, byteIdx int, isNew bool) {
	p := q.pend()
	d, ok := p.blocks[off]
	if !ok {
		d = &dirtyBlock{buf: buf, lo: byteIdx, hi: byteIdx + q.rcEntryBytes(), isNew: isNew}
		p.blocks[off] = d
		return
	}
	d.isNew = d.isNew || isNew
	d.lo = min(d.lo, byteIdx)
	d.hi = max(d.hi, byteIdx+q.rcEntryBytes())
}

func (q *Qcow2) markTable(ti int64) {
	p := q.pend()
	if !p.rtDirty {
		p.rtLo, p.rtHi, p.rtDirty = ti, ti+1, true
		return
	}
	p.rtLo = min(p.rtLo, ti)
	p.rtHi = max(p.rtHi, ti+1)
}

// setRefcount sets the refcount of host cluster ci in memory, creating refcount
// blocks (and growing the table) as needed. commitRefs writes the changes.
func (q *Qcow2) setRefcount(ci int64, v uint64) error {
	if v > q.maxRefcount() {
		return fmt.Errorf("refcount of cluster %d would overflow %d bits", ci, q.refBits)
	}
	ti := ci >> q.rpbBits
	blk, off, err := q.blockForWrite(ti)
	if err != nil {
		return err
	}
	idx := q.rcSet(blk, ci&(1<<q.rpbBits-1), v)
	q.markDirty(off, blk, idx, false)
	if v == 0 && ci < q.freeHint {
		q.freeHint = ci
	}
	return nil
}

// addRefcount adds delta (±1) to the refcount of host cluster ci.
func (q *Qcow2) addRefcount(ci int64, delta int) error {
	rc, err := q.refcount(ci)
	if err != nil {
		return err
	}
	if delta < 0 && rc == 0 {
		return formatErr(-1, "refcount", "cluster %#x: refcount would drop below zero", ci<<q.cb)
	}
	return q.setRefcount(ci, uint64(int64(rc)+int64(delta)))
}

// blockForWrite returns the refcount block of table index ti, creating it at the
// end of the file when missing.
func (q *Qcow2) blockForWrite(ti int64) ([]byte, int64, error) {
	if ti >= int64(len(q.refTable)) {
		if err := q.growRefTable(ti + 1); err != nil {
			return nil, 0, err
		}
	}
	blk, off, err := q.refBlock(ti)
	if err != nil || blk != nil {
		return blk, off, err
	}
	ci := q.endCluster()
	off = ci << q.cb
	q.fileSize = off + q.cs
	blk = make([]byte, q.cs)
	q.refTable[ti] = uint64(off)
	q.markTable(ti)
	q.markDirty(off, blk, 0, true)
	if ci>>q.rpbBits == ti {
		q.rcSet(blk, ci&(1<<q.rpbBits-1), 1) // the block covers itself
	} else if err := q.setRefcount(ci, 1); err != nil {
		return nil, 0, err
	}
	return blk, off, nil
}

// growRefTable moves the refcount table to a larger place at the end of the file
// that has room for at least need entries, then frees the old one.
func (q *Qcow2) growRefTable(need int64) error {
	perCluster := q.cs / 8
	entries := max(need, int64(len(q.refTable))*2)
	entries = (entries + perCluster - 1) / perCluster * perCluster
	var (
		start, nClusters int64
		newBlocks        []int64 // table indices that get a new block
	)
	for {
		if entries*8 > maxRefTableBytes {
			return fmt.Errorf("refcount table would exceed %d bytes: image too large", maxRefTableBytes)
		}
		nClusters = entries / perCluster
		start = q.endCluster()
		// Blocks needed for the table's clusters and for the new blocks themselves.
		newBlocks = newBlocks[:0]
		for {
			end := start + nClusters + int64(len(newBlocks))
			var want []int64
			for ti := start >> q.rpbBits; ti <= (end-1)>>q.rpbBits; ti++ {
				if ti >= int64(len(q.refTable)) || q.refTable[ti]&refTableOffsetMask == 0 {
					want = append(want, ti)
				}
			}
			if len(want) == len(newBlocks) {
				break
			}
			newBlocks = want
		}
		last := (start + nClusters + int64(len(newBlocks)) - 1) >> q.rpbBits
		if last < entries {
			break
		}
		entries *= 2
	}
	table := make([]uint64, entries)
	copy(table, q.refTable)
	oldOff, oldClusters := int64(q.h.refTableOffset), int64(q.h.refTableClusters)
	q.fileSize = (start + nClusters + int64(len(newBlocks))) << q.cb
	for j, ti := range newBlocks {
		off := (start + nClusters + int64(j)) << q.cb
		table[ti] = uint64(off)
		q.markDirty(off, make([]byte, q.cs), 0, true)
	}
	oldTable := q.refTable
	q.refTable = table // refBlock now finds the new blocks
	for ci := start; ci < start+nClusters+int64(len(newBlocks)); ci++ {
		blk, off, err := q.refBlock(ci >> q.rpbBits)
		if err != nil || blk == nil {
			q.refTable = oldTable
			return fmt.Errorf("grow refcount table: block for cluster %d missing: %v", ci, err)
		}
		q.markDirty(off, blk, q.rcSet(blk, ci&(1<<q.rpbBits-1), 1), false)
	}
	// Blocks first, then the table, then the header that points to it.
	if err := q.writeBlocks(); err != nil {
		return err
	}
	if err := q.barrier(); err != nil {
		return err
	}
	if err := q.writeRefTable(start<<q.cb, 0, entries, table); err != nil {
		return err
	}
	if err := q.barrier(); err != nil {
		return err
	}
	var hb [12]byte
	binary.BigEndian.PutUint64(hb[0:], uint64(start<<q.cb))
	binary.BigEndian.PutUint32(hb[8:], uint32(nClusters))
	if _, err := q.f.WriteAt(hb[:], 48); err != nil {
		return q.fail(fmt.Errorf("write header refcount table fields: %w", err))
	}
	if err := q.barrier(); err != nil {
		return err
	}
	q.h.refTableOffset, q.h.refTableClusters = uint64(start<<q.cb), uint32(nClusters)
	if p := q.pendingRefs; p != nil {
		p.rtDirty = false
	}
	for j := int64(0); j < oldClusters; j++ {
		if err := q.addRefcount(oldOff>>q.cb+j, -1); err != nil {
			return err
		}
	}
	return nil
}

// writeRefTable writes entries [lo, hi) of table at host offset base.
func (q *Qcow2) writeRefTable(base, lo, hi int64, table []uint64) error {
	buf := make([]byte, (hi-lo)*8)
	for i := lo; i < hi; i++ {
		binary.BigEndian.PutUint64(buf[(i-lo)*8:], table[i])
	}
	if _, err := q.f.WriteAt(buf, base+lo*8); err != nil {
		return q.fail(fmt.Errorf("write refcount table at %#x: %w", base+lo*8, err))
	}
	return nil
}

// writeBlocks writes the dirty refcount blocks and moves them to the cache.
func (q *Qcow2) writeBlocks() error {
	p := q.pendingRefs
	if p == nil {
		return nil
	}
	for off, d := range p.blocks {
		lo, hi := d.lo, d.hi
		if d.isNew {
			lo, hi = 0, int(q.cs)
		}
		if _, err := q.f.WriteAt(d.buf[lo:hi], off+int64(lo)); err != nil {
			return q.fail(fmt.Errorf("write refcount block at %#x: %w", off, err))
		}
		q.rbCache.put(off, d.buf)
		delete(p.blocks, off)
	}
	return nil
}

// commitRefs writes pending refcount changes: blocks, a barrier, then the
// refcount table entries that point to new blocks.
func (q *Qcow2) commitRefs() error {
	p := q.pendingRefs
	if p == nil {
		return nil
	}
	if err := q.writeBlocks(); err != nil {
		return err
	}
	if p.rtDirty {
		if err := q.barrier(); err != nil {
			return err
		}
		if err := q.writeRefTable(int64(q.h.refTableOffset), p.rtLo, p.rtHi, q.refTable); err != nil {
			return err
		}
		p.rtDirty = false
	}
	return nil
}

// findFree returns the first run of n free clusters, possibly at or running past
// the end of the file.
func (q *Qcow2) findFree(n int64) (int64, error) {
	end := q.endCluster()
	run, runStart, firstFree := int64(0), int64(-1), int64(-1)
	ci := q.freeHint
	for ci < end {
		ti := ci >> q.rpbBits
		blk, _, err := q.refBlock(ti)
		if err != nil {
			return 0, err
		}
		if blk == nil {
			// A missing block: the whole range it covers is free.
			if firstFree < 0 {
				firstFree = ci
			}
			if run == 0 {
				runStart = ci
			}
			next := min((ti+1)<<q.rpbBits, end)
			run += next - ci
			ci = next
			if run >= n {
				break
			}
			continue
		}
		if q.rcGet(blk, ci&(1<<q.rpbBits-1)) == 0 {
			if firstFree < 0 {
				firstFree = ci
			}
			if run == 0 {
				runStart = ci
			}
			run++
			if run == n {
				break
			}
		} else {
			run = 0
		}
		ci++
	}
	if firstFree < 0 {
		firstFree = end
	}
	q.freeHint = firstFree
	if run >= n {
		return runStart, nil
	}
	if run > 0 && runStart+run >= end {
		return runStart, nil // the free tail of the file continues past its end
	}
	return end, nil
}

// allocClusters reserves n contiguous host clusters (refcount 1, in memory) and
// returns the host offset of the first. The caller must commitRefs and barrier
// before writing anything that points to them.
func (q *Qcow2) allocClusters(n int64) (int64, error) {
	if n <= 0 {
		return 0, nil
	}
	start, err := q.findFree(n)
	if err != nil {
		return 0, err
	}
	if end := (start + n) << q.cb; end > q.fileSize {
		q.fileSize = end
	}
	for ci := start; ci < start+n; ci++ {
		if err := q.setRefcount(ci, 1); err != nil {
			return 0, err
		}
	}
	if q.freeHint == start {
		q.freeHint = start + n
	}
	return start << q.cb, nil
}

// fail records the first metadata write error: later writes are refused, since
// the in-memory tables may now differ from the file.
func (q *Qcow2) fail(err error) error {
	if q.firstErr == nil {
		q.firstErr = err
	}
	return err
}
