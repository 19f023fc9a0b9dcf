package syncd

import (
	"testing"
)

func BenchmarkEncodeRandom(b *testing.B) {
	raw := fill(7, 64<<10, false)
	dst := make([]byte, 0, 64<<10)
	b.SetBytes(int64(len(raw)))
	b.ReportAllocs()
	for b.Loop() {
		if _, err := encodeCluster(0, 1, raw, dst, encodeOptions{compress: true}); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkEncodeText(b *testing.B) {
	raw := fill(7, 64<<10, true)
	dst := make([]byte, 0, 64<<10)
	b.SetBytes(int64(len(raw)))
	b.ReportAllocs()
	for b.Loop() {
		if _, err := encodeCluster(0, 1, raw, dst, encodeOptions{compress: true}); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkDecodeText(b *testing.B) {
	raw := fill(7, 64<<10, true)
	ec, _ := encodeCluster(0, 1, raw, nil, encodeOptions{compress: true})
	f := frame{kind: kindData, enc: ec.enc, plen: uint32(len(ec.data)), n: int64(len(raw))}
	dst := make([]byte, 0, 64<<10)
	b.SetBytes(int64(len(raw)))
	for b.Loop() {
		if _, err := decodeCluster(f, ec.digest, ec.data, dst); err != nil {
			b.Fatal(err)
		}
	}
}
