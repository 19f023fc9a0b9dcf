package disk

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
)

// maxBatch bounds the guest bytes one metadata batch covers.
const maxBatch = 32 << 20

func (q *Qcow2) writable() error {
	switch {
	case q.closed:
		return ErrClosed
	case q.readOnly:
		return fmt.Errorf("%s: %w", q.path, ErrReadOnly)
	case q.firstErr != nil:
		return fmt.Errorf("%s: an earlier metadata write failed: %w", q.path, q.firstErr)
	case q.encrypted() && q.crypt == nil:
		return fmt.Errorf("%s: %w", q.path, ErrKeyRequired)
	}
	return nil
}

func (q *Qcow2) checkRange(off, n int64) error {
	if off < 0 || n < 0 || off > int64(q.h.size) || n > int64(q.h.size)-off {
		return fmt.Errorf("range %d+%d of a %d-byte disk: %w", off, n, q.h.size, ErrOutOfRange)
	}
	return nil
}

// WriteAt writes p at guest offset off into this layer.
func (q *Qcow2) WriteAt(p []byte, off int64) (int, error) {
	q.mu.Lock()
	defer q.mu.Unlock()
	if err := q.writable(); err != nil {
		return 0, err
	}
	if err := q.checkRange(off, int64(len(p))); err != nil {
		return 0, err
	}
	done := 0
	for done < len(p) {
		g := off + int64(done)
		// Batches end on cluster boundaries.
		n := int(min(int64(len(p)-done), maxBatch-(g&(q.cs-1))))
		if err := q.writeBatch(p[done:done+n], g); err != nil {
			return done, err
		}
		done += n
	}
	return done, nil
}

// l2Update collects L2 entry changes per table and writes each table's changed
// range once.
type l2Update struct {
	q      *Qcow2
	tables map[int64]*l2Dirty // by table host offset
}

type l2Dirty struct {
	buf    []byte
	lo, hi int64 // entry indices
}

func (u *l2Update) set(gc int64, e uint64) error {
	tbl, off, err := u.q.l2Table(gc>>u.q.l2Bits, false)
	if err != nil {
		return err
	}
	if tbl == nil {
		return fmt.Errorf("internal: L2 table for cluster %d missing", gc)
	}
	i := gc & u.q.l2Mask
	binary.BigEndian.PutUint64(tbl[i*8:], e)
	if u.tables == nil {
		u.tables = map[int64]*l2Dirty{}
	}
	d, ok := u.tables[off]
	if !ok {
		u.tables[off] = &l2Dirty{tbl, i, i + 1}
		return nil
	}
	d.lo, d.hi = min(d.lo, i), max(d.hi, i+1)
	return nil
}

func (u *l2Update) write() error {
	for off, d := range u.tables {
		if _, err := u.q.f.WriteAt(d.buf[d.lo*8:d.hi*8], off+d.lo*8); err != nil {
			u.q.l2Cache.drop(off)
			return u.q.fail(fmt.Errorf("write L2 table at %#x: %w", off, err))
		}
	}
	return nil
}

// allocL2 creates empty L2 tables for the given L1 indices: refcounts, barrier,
// zeroed tables, barrier, then the L1 entries.
func (q *Qcow2) allocL2(idx []int64) error {
	if len(idx) == 0 {
		return nil
	}
	start, err := q.allocClusters(int64(len(idx)))
	if err != nil {
		return err
	}
	if err := q.commitRefs(); err != nil {
		return err
	}
	if err := q.barrier(); err != nil {
		return err
	}
	zero := make([]byte, min(int64(len(idx))*q.cs, 4<<20))
	for done := int64(0); done < int64(len(idx))*q.cs; done += int64(len(zero)) {
		n := min(int64(len(zero)), int64(len(idx))*q.cs-done)
		if _, err := q.f.WriteAt(zero[:n], start+done); err != nil {
			return q.fail(fmt.Errorf("write new L2 tables at %#x: %w", start, err))
		}
	}
	if err := q.barrier(); err != nil {
		return err
	}
	for j, i := range idx {
		off := start + int64(j)*q.cs
		q.l2Cache.put(off, make([]byte, q.cs))
		q.l1[i] = uint64(off) | oflagCopied
		var b [8]byte
		binary.BigEndian.PutUint64(b[:], q.l1[i])
		if _, err := q.f.WriteAt(b[:], int64(q.h.l1Offset)+i*8); err != nil {
			return q.fail(fmt.Errorf("write L1 entry %d: %w", i, err))
		}
	}
	return nil
}

// ensureL2 allocates the missing L2 tables for guest clusters [gc0, gc1].
func (q *Qcow2) ensureL2(gc0, gc1 int64) error {
	var missing []int64
	for i := gc0 >> q.l2Bits; i <= gc1>>q.l2Bits; i++ {
		e := q.l1[i]
		if e&l1OffsetMask == 0 {
			missing = append(missing, i)
		} else if e&oflagCopied == 0 {
			return fmt.Errorf("%w: L2 table %d is shared (refcount > 1); writing needs copy-on-write of tables", ErrUnsupported, i)
		}
	}
	return q.allocL2(missing)
}

// release drops the reference an old L2 entry held.
func (q *Qcow2) release(e uint64) error {
	if e&oflagCompress != 0 {
		off, n := q.compressedRange(e)
		first := (off &^ 511) >> q.cb
		last := ((off &^ 511) + n - 1) >> q.cb
		for ci := first; ci <= last; ci++ {
			if err := q.addRefcount(ci, -1); err != nil {
				return err
			}
		}
		return nil
	}
	if host := int64(e & l2OffsetMask); host != 0 {
		return q.addRefcount(host>>q.cb, -1)
	}
	return nil
}

// writeBatch writes p at off; the range lies within maxBatch.
func (q *Qcow2) writeBatch(p []byte, off int64) error {
	if q.encrypted() && (off|int64(len(p)))&(luksSector-1) != 0 {
		// Data is encrypted in whole sectors: widen to them with what the
		// guest sees around the write.
		lo := off &^ (luksSector - 1)
		hi := (off + int64(len(p)) + luksSector - 1) &^ (luksSector - 1)
		w := make([]byte, hi-lo)
		if _, err := q.readAt(w, lo); err != nil && !errors.Is(err, io.EOF) {
			return fmt.Errorf("read around an unaligned write at %d: %w", off, err)
		}
		copy(w[off-lo:], p)
		p, off = w, lo
	}
	gc0 := off >> q.cb
	gc1 := (off + int64(len(p)) - 1) >> q.cb
	type clusterWrite struct {
		gc      int64
		old     uint64
		kind    entryKind
		host    int64
		lo, hi  int   // slice of p
		in      int64 // offset inside the cluster
		inPlace bool
	}
	cw := make([]clusterWrite, 0, gc1-gc0+1)
	var nAlloc int64
	for gc := gc0; gc <= gc1; gc++ {
		e, err := q.l2Entry(gc)
		if err != nil {
			return err
		}
		k, host, err := q.classify(e, gc)
		if err != nil {
			return err
		}
		g := max(off, gc<<q.cb)
		end := min(off+int64(len(p)), (gc+1)<<q.cb)
		c := clusterWrite{gc: gc, old: e, kind: k, host: host, lo: int(g - off), hi: int(end - off), in: g - gc<<q.cb}
		c.inPlace = k == kNormal && e&oflagCopied != 0
		if !c.inPlace {
			nAlloc++
		}
		cw = append(cw, c)
	}

	// In-place rewrites of clusters this layer owns: no metadata changes.
	for i := 0; i < len(cw); {
		if !cw[i].inPlace {
			i++
			continue
		}
		j := i + 1
		for j < len(cw) && cw[j].inPlace && cw[j].host == cw[j-1].host+q.cs {
			j++
		}
		host := cw[i].host + cw[i].in
		if err := q.writeData(p[cw[i].lo:cw[j-1].hi], host); err != nil {
			return fmt.Errorf("write data at %#x: %w", host, err)
		}
		i = j
	}
	if nAlloc == 0 {
		return nil
	}

	// Allocating writes: L2 tables, refcounts, barrier, data, barrier, L2 entries,
	// then (after another barrier) the release of what the old entries held.
	if err := q.ensureL2(gc0, gc1); err != nil {
		return err
	}
	start, err := q.allocClusters(nAlloc)
	if err != nil {
		return err
	}
	if err := q.commitRefs(); err != nil {
		return err
	}
	if err := q.barrier(); err != nil {
		return err
	}
	host := start
	var (
		runHost  int64 = -1
		runLo    int
		runHi    int
		buf      []byte
		needFree bool
	)
	writeRun := func() error {
		if runHost < 0 {
			return nil
		}
		if err := q.writeData(p[runLo:runHi], runHost); err != nil {
			return fmt.Errorf("write data at %#x: %w", runHost, err)
		}
		runHost = -1
		return nil
	}
	for i := range cw {
		c := &cw[i]
		if c.inPlace {
			continue
		}
		c.host = host
		host += q.cs
		full := c.in == 0 && int64(c.hi-c.lo) == q.cs
		if full {
			if runHost >= 0 && runHost+int64(runHi-runLo) == c.host && runHi == c.lo {
				runHi = c.hi
			} else {
				if err := writeRun(); err != nil {
					return err
				}
				runHost, runLo, runHi = c.host, c.lo, c.hi
			}
			continue
		}
		if err := writeRun(); err != nil {
			return err
		}
		// Partial cluster: copy the rest from what the guest saw before.
		if buf == nil {
			buf = make([]byte, q.cs)
		}
		if err := q.oldCluster(c.gc, c.old, c.kind, buf); err != nil {
			return err
		}
		copy(buf[c.in:], p[c.lo:c.hi])
		if err := q.writeData(buf, c.host); err != nil {
			return fmt.Errorf("write data at %#x: %w", c.host, err)
		}
	}
	if err := writeRun(); err != nil {
		return err
	}
	if err := q.barrier(); err != nil {
		return err
	}
	u := l2Update{q: q}
	for _, c := range cw {
		if c.inPlace {
			continue
		}
		if err := u.set(c.gc, uint64(c.host)|oflagCopied); err != nil {
			return err
		}
		needFree = needFree || c.kind == kCompressed || c.old&l2OffsetMask != 0
	}
	if err := u.write(); err != nil {
		return err
	}
	if !needFree {
		return nil
	}
	if err := q.barrier(); err != nil {
		return err
	}
	for _, c := range cw {
		if !c.inPlace {
			if err := q.release(c.old); err != nil {
				return err
			}
		}
	}
	return q.commitRefs()
}

// oldCluster fills buf with the guest view of cluster gc before a write.
func (q *Qcow2) oldCluster(gc int64, e uint64, k entryKind, buf []byte) error {
	switch k {
	case kZero:
		clear(buf)
	case kCompressed:
		d, err := q.readCompressed(e, gc)
		if err != nil {
			return err
		}
		copy(buf, d)
	case kNormal:
		if _, err := q.readData(buf, int64(e&l2OffsetMask)); err != nil {
			return fmt.Errorf("read cluster %d for copy-on-write: %w", gc, err)
		}
	default:
		g := gc << q.cb
		n := min(q.cs, int64(q.h.size)-g)
		clear(buf[n:])
		if err := readBacking(q.backing, buf[:n], g); err != nil {
			return fmt.Errorf("copy-on-write of cluster %d: %w", gc, err)
		}
	}
	return nil
}

// WriteZeroes makes [off, off+n) read as zeros. Whole clusters become zero
// clusters (v3) and give back their host clusters; partial ones get zero data.
func (q *Qcow2) WriteZeroes(off, n int64) error { return q.zeroRange(off, n, zeroWrite) }

// Discard makes [off, off+n) read as zeros and frees the host clusters of whole
// clusters: they become unallocated when nothing lies below, zero clusters when a
// backing file would otherwise show through.
func (q *Qcow2) Discard(off, n int64) error { return q.zeroRange(off, n, zeroDiscard) }

// ZeroClusters is WriteZeroes that sets the v3 zero flag on every whole cluster
// of the range even where nothing lies below, so that a backing file given to
// the image later does not show through (a safe rebase of a standalone image).
// Found by type assertion: it is not part of Image.
func (q *Qcow2) ZeroClusters(off, n int64) error { return q.zeroRange(off, n, zeroAlways) }

// zeroMode says what whole clusters become.
type zeroMode uint8

const (
	zeroWrite   zeroMode = iota // zero flag where something could show through
	zeroDiscard                 // unallocated where nothing lies below, else zero flag
	zeroAlways                  // zero flag (v3)
)

func (q *Qcow2) zeroRange(off, n int64, mode zeroMode) error {
	q.mu.Lock()
	defer q.mu.Unlock()
	if err := q.writable(); err != nil {
		return err
	}
	if err := q.checkRange(off, n); err != nil {
		return err
	}
	if n == 0 {
		return nil
	}
	end := off + n
	// Whole clusters inside the range; the virtual end counts as a boundary.
	first := (off + q.cs - 1) >> q.cb
	last := end >> q.cb // exclusive
	if end == int64(q.h.size) {
		last = (end + q.cs - 1) >> q.cb
	}
	if first >= last {
		return q.zeroData(off, n)
	}
	if head := first<<q.cb - off; head > 0 {
		if err := q.zeroData(off, head); err != nil {
			return err
		}
	}
	if tail := end - last<<q.cb; tail > 0 {
		if err := q.zeroData(last<<q.cb, tail); err != nil {
			return err
		}
	}
	if q.h.version < 3 {
		// No zero flag: unallocate where nothing shows through, else write zeros.
		if q.backing != nil {
			return q.zeroData(first<<q.cb, min(last<<q.cb, int64(q.h.size))-first<<q.cb)
		}
	}
	for gc := first; gc < last; {
		stop := min(last, gc+maxBatch>>q.cb)
		if err := q.zeroClusters(gc, stop, mode); err != nil {
			return err
		}
		gc = stop
	}
	return nil
}

// zeroData writes zero bytes (used for partial clusters).
func (q *Qcow2) zeroData(off, n int64) error {
	z := make([]byte, min(n, maxBatch))
	for n > 0 {
		k := min(n, int64(len(z)))
		if err := q.writeBatch(z[:k], off); err != nil {
			return err
		}
		off += k
		n -= k
	}
	return nil
}

// zeroClusters turns guest clusters [gc0, gc1) into zero or unallocated entries.
func (q *Qcow2) zeroClusters(gc0, gc1 int64, mode zeroMode) error {
	// What every whole cluster of the range becomes.
	var w uint64
	if q.h.version >= 3 && (q.backing != nil || mode != zeroDiscard) {
		w = oflagZero
	}
	var need []int64
	var changed []int64
	var olds []uint64
	for gc := gc0; gc < gc1; gc++ {
		e, err := q.l2Entry(gc)
		if err != nil {
			return err
		}
		if _, _, err := q.classify(e, gc); err != nil {
			return err
		}
		if e == w || (e == 0 && q.backing == nil && mode != zeroAlways) {
			continue // already reads as zeros with nothing held
		}
		if q.l1[gc>>q.l2Bits]&l1OffsetMask == 0 {
			if w == 0 {
				continue
			}
			need = append(need, gc)
		}
		changed = append(changed, gc)
		olds = append(olds, e)
	}
	if len(changed) == 0 {
		return nil
	}
	if len(need) > 0 {
		if err := q.ensureL2(need[0], need[len(need)-1]); err != nil {
			return err
		}
	}
	u := l2Update{q: q}
	for _, gc := range changed {
		if err := u.set(gc, w); err != nil {
			return err
		}
	}
	if err := u.write(); err != nil {
		return err
	}
	if err := q.barrier(); err != nil {
		return err
	}
	for _, e := range olds {
		if err := q.release(e); err != nil {
			return err
		}
	}
	return q.commitRefs()
}
