package disk

import (
	"bytes"
	"errors"
	"testing"
)

// FuzzLUKSHeader feeds arbitrary LUKS regions to the header parser and the key
// slot unlock: nothing may panic, read outside the region or accept a key that
// does not open a slot.
func FuzzLUKSHeader(f *testing.F) {
	for _, stripes := range []int{1, 2, 7} {
		region, _, err := buildLUKS(&Encryption{Key: []byte("fuzz-key")}, stripes)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(region, []byte("fuzz-key"))
		f.Add(region, []byte("other"))
	}
	f.Fuzz(func(t *testing.T, region, key []byte) {
		h, err := parseLUKS(region, int64(len(region)))
		if err != nil {
			if !errors.Is(err, ErrCorrupt) && !errors.Is(err, ErrUnsupported) {
				t.Fatalf("parse error %v is neither ErrCorrupt nor ErrUnsupported", err)
			}
			return
		}
		if h.mkDigestIter > 4000 {
			return // costly by design (QEMU's default calibrates to 2 s); bounded by luksMaxIter
		}
		for _, s := range h.slots {
			if s.active == luksSlotActive && s.iterations > 4000 {
				return
			}
		}
		c, err := h.unlock(key, func(off, n int64) ([]byte, error) {
			if off < 0 || off+n > int64(len(region)) {
				t.Fatalf("key material %d+%d read outside a %d-byte region", off, n, len(region))
			}
			return bytes.Clone(region[off : off+n]), nil
		})
		if err == nil && c == nil {
			t.Fatal("unlock succeeded without a cipher")
		}
		if err != nil && !errors.Is(err, ErrBadKey) {
			t.Fatalf("unlock: %v", err)
		}
	})
}
