package testutil

import "math/rand/v2"

// Fill returns n bytes: pseudo-random from seed, or a compressible pattern when
// compressible is set.
func Fill(seed uint64, n int64, compressible bool) []byte {
	b := make([]byte, n)
	r := rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))
	if compressible {
		for i := int64(0); i < n; i += 64 {
			v := byte(r.IntN(4))
			for j := i; j < min(i+64, n); j++ {
				b[j] = v + byte(j%7)
			}
		}
		return b
	}
	for i := int64(0); i+8 <= n; i += 8 {
		x := r.Uint64()
		for k := 0; k < 8; k++ {
			b[i+int64(k)] = byte(x >> (8 * k))
		}
	}
	return b
}
