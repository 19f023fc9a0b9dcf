package overlay

import (
	"encoding/binary"
	"fmt"
	"slices"
)

// Range is a guest byte range [Off, Off+Len).
type Range struct {
	Off int64 `json:"offset"`
	Len int64 `json:"length"`
}

// End is Off+Len.
func (r Range) End() int64 { return r.Off + r.Len }

func (r Range) String() string { return fmt.Sprintf("[%d, %d)", r.Off, r.End()) }

// RangeSet is a list of ranges being built; Normalize sorts and merges it.
type RangeSet []Range

// Add appends [off, off+n) (nothing when n is not positive).
func (s *RangeSet) Add(off, n int64) {
	if n > 0 {
		*s = append(*s, Range{off, n})
	}
}

// Normalize sorts the ranges and merges those that overlap or touch.
func (s RangeSet) Normalize() RangeSet {
	if len(s) < 2 {
		return s
	}
	slices.SortFunc(s, func(a, b Range) int {
		switch {
		case a.Off < b.Off:
			return -1
		case a.Off > b.Off:
			return 1
		}
		return 0
	})
	out := s[:1]
	for _, r := range s[1:] {
		l := &out[len(out)-1]
		if r.Off <= l.End() {
			l.Len = max(l.End(), r.End()) - l.Off
			continue
		}
		out = append(out, r)
	}
	return out
}

// Align rounds every range out to multiples of g, clips it to [lo, hi), and
// merges the result (s must be normalized).
func (s RangeSet) Align(g, lo, hi int64) RangeSet {
	out := s[:0]
	for _, r := range s {
		a := max(lo, r.Off/g*g)
		b := min(hi, (r.End()+g-1)/g*g)
		if a >= b {
			continue
		}
		if n := len(out); n > 0 && a <= out[n-1].End() {
			out[n-1].Len = max(out[n-1].End(), b) - out[n-1].Off
			continue
		}
		out = append(out, Range{a, b - a})
	}
	return out
}

// Subtract removes the ranges of t (normalized) from s (normalized).
func (s RangeSet) Subtract(t RangeSet) RangeSet {
	var out RangeSet
	j := 0
	for _, r := range s {
		off, end := r.Off, r.End()
		for j < len(t) && t[j].End() <= off {
			j++
		}
		for k := j; k < len(t) && t[k].Off < end && off < end; k++ {
			if t[k].Off > off {
				out = append(out, Range{off, t[k].Off - off})
			}
			off = max(off, t[k].End())
		}
		if off < end {
			out = append(out, Range{off, end - off})
		}
	}
	return out
}

// appendMerged appends r to rs, merging it with the last range when they touch.
func appendMerged(rs []Range, r Range) []Range {
	if n := len(rs); n > 0 && rs[n-1].End() == r.Off {
		rs[n-1].Len += r.Len
		return rs
	}
	return append(rs, r)
}

// isZero reports whether b holds only zero bytes.
func isZero(b []byte) bool {
	for len(b) >= 32 {
		le := binary.LittleEndian
		if le.Uint64(b)|le.Uint64(b[8:])|le.Uint64(b[16:])|le.Uint64(b[24:]) != 0 {
			return false
		}
		b = b[32:]
	}
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}
