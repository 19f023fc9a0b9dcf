package proto

import (
	"testing"

	"github.com/cvd-project/cvd/internal/testutil"
)

func BenchmarkEncodeRandom(b *testing.B) {
	raw := testutil.Fill(7, 64<<10, false)
	dst := make([]byte, 0, 64<<10)
	b.SetBytes(int64(len(raw)))
	b.ReportAllocs()
	for b.Loop() {
		if _, err := EncodeCluster(0, 1, raw, dst, EncodeOptions{Compress: true}); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkEncodeText(b *testing.B) {
	raw := testutil.Fill(7, 64<<10, true)
	dst := make([]byte, 0, 64<<10)
	b.SetBytes(int64(len(raw)))
	b.ReportAllocs()
	for b.Loop() {
		if _, err := EncodeCluster(0, 1, raw, dst, EncodeOptions{Compress: true}); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkDecodeText(b *testing.B) {
	raw := testutil.Fill(7, 64<<10, true)
	ec, _ := EncodeCluster(0, 1, raw, nil, EncodeOptions{Compress: true})
	f := Frame{Kind: KindData, Enc: ec.Enc, PLen: uint32(len(ec.Data)), N: int64(len(raw))}
	dst := make([]byte, 0, 64<<10)
	b.SetBytes(int64(len(raw)))
	for b.Loop() {
		if _, err := DecodeCluster(f, ec.Digest, ec.Data, dst); err != nil {
			b.Fatal(err)
		}
	}
}
