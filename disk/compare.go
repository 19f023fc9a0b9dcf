package disk

import (
	"bytes"
	"context"
	"fmt"
)

// Compare reports the first guest offset where a and b differ, or -1 when they
// read the same. When sizes differ, the extra part of the larger must read as
// zeros (qemu-img compare's non-strict rule). Ranges both chains map as zero are
// not read.
func Compare(ctx context.Context, a, b Image) (int64, error) {
	sa, sb := a.Size(), b.Size()
	ma, err := MapChain(a, 0, sa)
	if err != nil {
		return 0, err
	}
	mb, err := MapChain(b, 0, sb)
	if err != nil {
		return 0, err
	}
	bufA := make([]byte, 1<<20)
	bufB := make([]byte, 1<<20)
	end := max(sa, sb)
	ia, ib := 0, 0
	zeroAt := func(m []ChainExtent, i *int, off int64) (bool, int64) {
		for *i < len(m) && m[*i].Off+m[*i].Len <= off {
			*i++
		}
		if *i >= len(m) {
			return true, end // past the end of this image: zeros
		}
		return m[*i].Zero, m[*i].Off + m[*i].Len
	}
	for off := int64(0); off < end; {
		if err := ctx.Err(); err != nil {
			return 0, err
		}
		za, ea := zeroAt(ma, &ia, off)
		zb, eb := zeroAt(mb, &ib, off)
		stop := min(ea, eb)
		if za && zb {
			off = stop
			continue
		}
		for off < stop {
			n := min(int64(len(bufA)), stop-off)
			pa, pb := bufA[:n], bufB[:n]
			if err := readOrZero(a, pa, off, za); err != nil {
				return 0, err
			}
			if err := readOrZero(b, pb, off, zb); err != nil {
				return 0, err
			}
			if !bytes.Equal(pa, pb) {
				for i := range pa {
					if pa[i] != pb[i] {
						return off + int64(i), nil
					}
				}
			}
			off += n
		}
	}
	return -1, nil
}

func readOrZero(img Image, p []byte, off int64, zero bool) error {
	if zero || off >= img.Size() {
		clear(p)
		return nil
	}
	n := min(int64(len(p)), img.Size()-off)
	if _, err := img.ReadAt(p[:n], off); err != nil {
		return fmt.Errorf("read %s at %d: %w", img.Info().Path, off, err)
	}
	clear(p[n:])
	return nil
}
