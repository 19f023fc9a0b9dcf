package disk

import (
	"encoding/binary"
	"fmt"
)

// appendExtent adds e to exts, merging it with the last extent when they continue
// each other.
func appendExtent(exts []Extent, e Extent) []Extent {
	if n := len(exts); n > 0 {
		l := &exts[n-1]
		if l.Off+l.Len == e.Off && l.State == e.State && l.Compressed == e.Compressed {
			contiguous := l.HostOff < 0 && e.HostOff < 0 || l.HostOff >= 0 && l.HostOff+l.Len == e.HostOff
			if l.State != Data || contiguous {
				l.Len += e.Len
				return exts
			}
		}
	}
	return append(exts, e)
}

// MapLayer reports what this layer alone holds for [off, off+n). An empty L1
// entry is skipped whole, so a sparse terabyte maps in milliseconds.
func (q *Qcow2) MapLayer(off, n int64) ([]Extent, error) {
	q.mu.RLock()
	defer q.mu.RUnlock()
	if q.closed {
		return nil, ErrClosed
	}
	if err := q.checkRange(off, n); err != nil {
		return nil, err
	}
	var exts []Extent
	scratch, _ := q.scratch.Get().([]byte)
	defer func() {
		if scratch != nil {
			q.scratch.Put(scratch)
		}
	}()
	end := off + n
	l2Span := q.cs << q.l2Bits
	for g := off; g < end; {
		i := g / l2Span
		if q.l1[i]&l1OffsetMask == 0 {
			stop := min(end, (i+1)*l2Span)
			exts = appendExtent(exts, Extent{Off: g, Len: stop - g, State: Unallocated, HostOff: -1})
			g = stop
			continue
		}
		// One table lookup, then the entries of this L2 table in the range. A
		// table not in the cache is read into a scratch buffer: a map of a large
		// layer would otherwise evict every table the reads are using.
		tbl, err := q.l2TableScratch(i, &scratch)
		if err != nil {
			return nil, err
		}
		tEnd := min(end, (i+1)*l2Span)
		for g < tEnd {
			gc := g >> q.cb
			stop := min(tEnd, (gc+1)<<q.cb)
			e := binary.BigEndian.Uint64(tbl[(gc&q.l2Mask)*8:])
			k, host, err := q.classify(e, gc)
			if err != nil {
				return nil, err
			}
			x := Extent{Off: g, Len: stop - g, HostOff: -1}
			switch k {
			case kUnalloc:
				x.State = Unallocated
			case kZero:
				x.State = Zero
			case kNormal:
				x.State, x.HostOff = Data, host+(g-gc<<q.cb)
			case kCompressed:
				x.State, x.Compressed = Data, true
			}
			exts = appendExtent(exts, x)
			g = stop
		}
	}
	return exts, nil
}

// l2TableScratch returns L2 table i (whose L1 entry is set) from the cache, or
// read into *scratch without caching it.
func (q *Qcow2) l2TableScratch(i int64, scratch *[]byte) ([]byte, error) {
	off := int64(q.l1[i] & l1OffsetMask)
	if off%q.cs != 0 || off+q.cs > q.fileSize {
		return nil, formatErr(int64(q.h.l1Offset)+i*8, "L1 entry", "L2 table offset %#x unaligned or past the end of the file", off)
	}
	if t := q.l2Cache.get(off); t != nil {
		return t, nil
	}
	if *scratch == nil {
		*scratch = make([]byte, q.cs)
	}
	if _, err := q.f.ReadAt(*scratch, off); err != nil {
		return nil, fmt.Errorf("read L2 table at %#x: %w", off, err)
	}
	return *scratch, nil
}

// MapChain reports which layer of img's chain serves each part of [off, off+n).
func MapChain(img Image, off, n int64) ([]ChainExtent, error) {
	var out []ChainExtent
	err := mapChain(img, off, n, 0, &out)
	return out, err
}

func mapChain(img Image, off, n int64, depth int, out *[]ChainExtent) error {
	if depth > DefaultMaxDepth*4 {
		return fmt.Errorf("map: %w", ErrChainTooDeep)
	}
	add := func(e ChainExtent) {
		if k := len(*out); k > 0 {
			l := &(*out)[k-1]
			if l.Off+l.Len == e.Off && l.Depth == e.Depth && l.Zero == e.Zero {
				l.Len += e.Len
				return
			}
		}
		*out = append(*out, e)
	}
	exts, err := img.MapLayer(off, n)
	if err != nil {
		return err
	}
	for _, x := range exts {
		switch x.State {
		case Data:
			add(ChainExtent{Off: x.Off, Len: x.Len, Depth: depth})
		case Zero:
			add(ChainExtent{Off: x.Off, Len: x.Len, Depth: depth, Zero: true})
		default:
			b := img.Backing()
			if b == nil {
				add(ChainExtent{Off: x.Off, Len: x.Len, Depth: -1, Zero: true})
				continue
			}
			bs := b.Size()
			in := min(x.Off+x.Len, bs) - x.Off
			if in > 0 {
				if err := mapChain(b, x.Off, in, depth+1, out); err != nil {
					return err
				}
			} else {
				in = 0
			}
			if in < x.Len {
				add(ChainExtent{Off: x.Off + in, Len: x.Len - in, Depth: -1, Zero: true})
			}
		}
	}
	return nil
}
