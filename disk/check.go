package disk

import (
	"encoding/binary"
	"fmt"
)

// CheckResult counts what Check found, with the same meaning as the fields of
// `qemu-img check --output=json`.
type CheckResult struct {
	Filename           string   `json:"filename"`
	Format             Format   `json:"format"`
	CheckErrors        int      `json:"check-errors"` // problems that stopped parts of the check
	Corruptions        int      `json:"corruptions"`  // references to free or out-of-file clusters, bad flags, refcount too low
	Leaks              int      `json:"leaks"`        // clusters whose refcount is higher than their references
	CorruptionsFixed   int      `json:"corruptions-fixed"`
	LeaksFixed         int      `json:"leaks-fixed"`
	TotalClusters      int64    `json:"total-clusters"` // guest clusters of the virtual size
	AllocatedClusters  int64    `json:"allocated-clusters"`
	FragmentedClusters int64    `json:"fragmented-clusters"`
	CompressedClusters int64    `json:"compressed-clusters"`
	ImageEndOffset     int64    `json:"image-end-offset"`
	Messages           []string `json:"messages,omitempty"` // one line per problem
}

// Clean reports a check with no errors and no leaks.
func (r *CheckResult) Clean() bool { return r.CheckErrors+r.Corruptions+r.Leaks == 0 }

// maxCheckMessages bounds the problem lines a check keeps.
const maxCheckMessages = 1000

// Check verifies one qcow2 file's refcounts against the references its tables
// make (header, L1 and L2 tables, data and compressed clusters, refcount table
// and blocks, snapshot tables), counting errors and leaks the way qemu-img check
// does. With repair, leaked clusters get their refcount lowered to the true
// count; corruption is reported, never "fixed" by guessing. Backing files are not
// opened: check each layer of a chain on its own.
func Check(path string, repair bool) (*CheckResult, error) {
	img, err := Open(path, OpenOptions{ReadOnly: !repair, NoBacking: true})
	if err != nil {
		return nil, err
	}
	defer img.Close()
	q, ok := img.(*Qcow2)
	if !ok {
		return nil, fmt.Errorf("%s: %w: %s images have no metadata to check", path, ErrUnsupported, img.Info().Format)
	}
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.h.hasBitmapsExt {
		return nil, fmt.Errorf("%s: %w: checking images with persistent bitmaps", path, ErrUnsupported)
	}
	c := &checker{q: q, res: &CheckResult{Filename: path, Format: FormatQcow2}}
	c.run()
	if repair && c.res.Corruptions == 0 && c.res.Leaks > 0 {
		if err := c.repairLeaks(); err != nil {
			return c.res, fmt.Errorf("repair %s: %w", path, err)
		}
	}
	return c.res, nil
}

type checker struct {
	q      *Qcow2
	res    *CheckResult
	refs   []uint32 // references per host cluster, from the tables
	leaked []int64
}

func (c *checker) msg(format string, args ...any) {
	if len(c.res.Messages) < maxCheckMessages {
		c.res.Messages = append(c.res.Messages, fmt.Sprintf(format, args...))
	}
}

// ref counts one reference to each host cluster in [off, off+n).
func (c *checker) ref(off, n int64, what string) {
	q := c.q
	if n <= 0 {
		return
	}
	if off < 0 || off >= q.fileSize || n > q.fileSize-off+q.cs {
		c.res.Corruptions++
		c.msg("ERROR %s: range %#x+%d is outside the image file (%d bytes)", what, off, n, q.fileSize)
		return
	}
	first, last := off>>q.cb, (off+n-1)>>q.cb
	for ci := first; ci <= last; ci++ {
		if ci<<q.cb >= q.fileSize {
			c.res.Corruptions++
			c.msg("ERROR %s: cluster %#x is past the end of the image file (%d bytes)", what, ci<<q.cb, q.fileSize)
			continue
		}
		c.refs[ci]++
	}
}

func (c *checker) run() {
	q := c.q
	fileClusters := q.endCluster()
	c.refs = make([]uint32, fileClusters)
	c.res.TotalClusters = (int64(q.h.size) + q.cs - 1) >> q.cb

	c.ref(0, q.cs, "header")
	if q.encrypted() {
		c.ref(int64(q.h.cryptOffset), int64(q.h.cryptLength), "LUKS header")
	}
	c.ref(int64(q.h.l1Offset), int64(q.h.l1Size)*8, "L1 table")
	c.walkL1(q.l1, true)
	c.snapshots()
	c.ref(int64(q.h.refTableOffset), int64(q.h.refTableClusters)*q.cs, "refcount table")
	for ti, e := range q.refTable {
		off := int64(e & refTableOffsetMask)
		if off == 0 {
			continue
		}
		if off%q.cs != 0 || e&^refTableOffsetMask != 0 {
			c.res.Corruptions++
			c.msg("ERROR refcount block %d: bad table entry %#x", ti, e)
			continue
		}
		c.ref(off, q.cs, "refcount block")
	}

	// Compare with the stored refcounts, over the file and every refcount block.
	span := fileClusters
	if n := int64(len(q.refTable)) << q.rpbBits; n < span {
		// Clusters with no possible refcount entry.
		for ci := n; ci < span; ci++ {
			if c.refs[ci] > 0 {
				c.res.Corruptions++
				c.msg("ERROR cluster %d is referenced but beyond the refcount table", ci)
			}
		}
		span = n
	}
	var highest int64 = -1
	for ci := int64(0); ci < span; ci++ {
		rc, err := q.refcount(ci)
		if err != nil {
			c.res.Corruptions++
			c.msg("ERROR cannot read refcount of cluster %d: %v", ci, err)
			// Skip the rest of that block.
			ci = (ci>>q.rpbBits+1)<<q.rpbBits - 1
			continue
		}
		refs := uint64(c.refs[ci])
		if refs > 0 || rc > 0 {
			highest = ci
		}
		switch {
		case refs > rc:
			c.res.Corruptions++
			c.msg("ERROR cluster %d refcount=%d reference=%d", ci, rc, refs)
		case refs < rc:
			c.res.Leaks++
			c.leaked = append(c.leaked, ci)
			c.msg("Leaked cluster %d refcount=%d reference=%d", ci, rc, refs)
		}
	}
	c.res.ImageEndOffset = (highest + 1) << q.cb
}

// walkL1 counts the references of an L1 table's L2 tables and their clusters.
// Statistics follow qemu-img check: zero clusters that keep their host cluster
// count as allocated, every compressed cluster counts as fragmented, and
// contiguity is judged within one L2 table.
func (c *checker) walkL1(l1 []uint64, active bool) {
	q := c.q
	for i, e := range l1 {
		off := int64(e & l1OffsetMask)
		if off == 0 {
			continue
		}
		if off%q.cs != 0 || off+q.cs > q.fileSize {
			c.res.Corruptions++
			c.msg("ERROR L1 entry %d: L2 table offset %#x unaligned or past the end of the file", i, off)
			continue
		}
		c.ref(off, q.cs, "L2 table")
		if active {
			c.checkCopied(e, off, "L2 cluster")
		}
		tbl := make([]byte, q.cs)
		if _, err := q.f.ReadAt(tbl, off); err != nil {
			c.res.CheckErrors++
			c.msg("ERROR reading L2 table at %#x: %v", off, err)
			continue
		}
		var next int64 // next contiguous host offset, per L2 table
		for j := int64(0); j < q.cs/8; j++ {
			e := binary.BigEndian.Uint64(tbl[j*8:])
			gc := int64(i)<<q.l2Bits + j
			if e&oflagCompress != 0 {
				if e&oflagCopied != 0 {
					c.res.Corruptions++
					c.msg("ERROR compressed cluster %d has the COPIED flag", gc)
				}
				co, n := q.compressedRange(e)
				c.ref(co&^511, n+co&511, "compressed cluster")
				if active {
					c.res.AllocatedClusters++
					c.res.CompressedClusters++
					c.res.FragmentedClusters++
				}
				continue
			}
			host := int64(e & l2OffsetMask)
			if active && host != 0 && host%q.cs == 0 {
				c.checkCopied(e, host, "data cluster")
			}
			if e&(l2ReservedMask&^oflagZero) != 0 || (q.h.version < 3 && e&oflagZero != 0) {
				c.res.Corruptions++
				c.msg("ERROR L2 entry for cluster %d has reserved bits set: %#x", gc, e)
				continue
			}
			if host == 0 {
				continue
			}
			if active {
				c.res.AllocatedClusters++
				if next != 0 && host != next {
					c.res.FragmentedClusters++
				}
				next = host + q.cs
			}
			c.ref(host, q.cs, "data cluster")
			if host%q.cs != 0 {
				c.res.Corruptions++
				c.msg("ERROR cluster %d: host offset %#x is not cluster-aligned", gc, host)
			}
		}
	}
}

// snapshots counts the snapshot table and each snapshot's tables.
func (c *checker) snapshots() {
	q := c.q
	if q.h.nbSnapshots == 0 {
		return
	}
	off := int64(q.h.snapshotsOffset)
	start := off
	be := binary.BigEndian
	for i := uint32(0); i < q.h.nbSnapshots; i++ {
		var hd [40]byte
		if _, err := q.f.ReadAt(hd[:], off); err != nil {
			c.res.CheckErrors++
			c.msg("ERROR reading snapshot %d header at %#x: %v", i, off, err)
			return
		}
		l1Off := int64(be.Uint64(hd[0:]))
		l1Size := int64(be.Uint32(hd[8:]))
		idLen := int64(be.Uint16(hd[12:]))
		nameLen := int64(be.Uint16(hd[14:]))
		extra := int64(be.Uint32(hd[36:]))
		if extra > 1<<16 {
			c.res.Corruptions++
			c.msg("ERROR snapshot %d: extra data size %d too large", i, extra)
			return
		}
		if l1Size*8 > maxL1Bytes || l1Off%q.cs != 0 || l1Off+l1Size*8 > q.fileSize {
			c.res.Corruptions++
			c.msg("ERROR snapshot %d: L1 table %#x+%d invalid", i, l1Off, l1Size)
		} else if l1Size > 0 {
			c.ref(l1Off, l1Size*8, "snapshot L1 table")
			buf := make([]byte, l1Size*8)
			if _, err := q.f.ReadAt(buf, l1Off); err != nil {
				c.res.CheckErrors++
				c.msg("ERROR reading snapshot %d L1 table: %v", i, err)
			} else {
				l1 := make([]uint64, l1Size)
				for k := range l1 {
					l1[k] = be.Uint64(buf[k*8:])
				}
				c.walkL1(l1, false)
			}
		}
		off += (40 + extra + idLen + nameLen + 7) &^ 7
	}
	c.ref(start, off-start, "snapshot table")
}

// checkCopied counts a COPIED flag (bit 63 of an active L1 or L2 entry) that
// does not say what the stored refcount of the cluster it points to says: exactly 1.
func (c *checker) checkCopied(e uint64, host int64, what string) {
	rc, err := c.q.refcount(host >> c.q.cb)
	if err != nil {
		return // the refcount comparison reports unreadable refcounts
	}
	if (rc == 1) != (e&oflagCopied != 0) {
		c.res.Corruptions++
		c.msg("ERROR OFLAG_COPIED %s: entry=%#x refcount=%d", what, e, rc)
	}
}

// repairLeaks lowers leaked refcounts to the counted references.
func (c *checker) repairLeaks() error {
	q := c.q
	if q.readOnly {
		return ErrReadOnly
	}
	for _, ci := range c.leaked {
		if err := q.setRefcount(ci, uint64(c.refs[ci])); err != nil {
			return err
		}
	}
	if err := q.commitRefs(); err != nil {
		return err
	}
	if err := q.f.Sync(); err != nil {
		return err
	}
	c.res.LeaksFixed = c.res.Leaks
	c.res.Leaks = 0
	return nil
}
