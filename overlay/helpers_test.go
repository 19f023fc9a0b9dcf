package overlay

import (
	"bytes"
	"testing"

	"github.com/cvd-project/cvd/disk"
)

// bruteDiff compares every cluster of granularity g of the guest views of a and b.
func bruteDiff(t testing.TB, a, b disk.Image, g int64) []Range {
	t.Helper()
	end := max(a.Size(), b.Size())
	ba, bb := make([]byte, g), make([]byte, g)
	var out []Range
	for off := int64(0); off < end; off += g {
		n := min(g, end-off)
		if err := disk.ReadView(a, ba[:n], off); err != nil {
			t.Fatal(err)
		}
		if err := disk.ReadView(b, bb[:n], off); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(ba[:n], bb[:n]) {
			out = appendMerged(out, Range{off, n})
		}
	}
	return out
}
