package overlay

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"slices"

	"github.com/cvd-project/cvd/disk"
)

// Range is a guest byte range [Off, Off+Len).
type Range struct {
	Off int64 `json:"offset"`
	Len int64 `json:"length"`
}

// End is Off+Len.
func (r Range) End() int64 { return r.Off + r.Len }

func (r Range) String() string { return fmt.Sprintf("[%d, %d)", r.Off, r.End()) }

// rangeSet is a list of ranges being built; normalize sorts and merges it.
type rangeSet []Range

func (s *rangeSet) add(off, n int64) {
	if n > 0 {
		*s = append(*s, Range{off, n})
	}
}

// normalize sorts the ranges and merges those that overlap or touch.
func (s rangeSet) normalize() rangeSet {
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

// align rounds every range out to multiples of g, clips it to [lo, hi), and
// merges the result (s must be normalized).
func (s rangeSet) align(g, lo, hi int64) rangeSet {
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

// subtract removes the ranges of t (normalized) from s (normalized).
func (s rangeSet) subtract(t rangeSet) rangeSet {
	var out rangeSet
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

// readView fills p with the guest view of img at off: zeros where img is nil or
// past its end.
func readView(img disk.Image, p []byte, off int64) error {
	if img == nil || off >= img.Size() {
		clear(p)
		return nil
	}
	n := min(int64(len(p)), img.Size()-off)
	if _, err := img.ReadAt(p[:n], off); err != nil && !errors.Is(err, io.EOF) {
		return fmt.Errorf("read %s at %d: %w", img.Info().Path, off, err)
	}
	clear(p[n:])
	return nil
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
