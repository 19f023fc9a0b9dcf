package disk_test

// Benchmarks of the engine alone, on sparse images 0/50/100 % allocated and
// chains 1/4/16 deep (go-qcow2reader's Benchmark0p/50p/100p), plus
// BenchmarkImage*, which scripts/bench.sh runs on the same files it gives QEMU.
//
//	go test -run '^$' -bench . -benchtime 2x ./disk

import (
	"context"
	"encoding/binary"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"testing"

	"github.com/cvd-project/cvd/disk"
)

const (
	benchSize    = 64 << 20 // virtual size of the synthetic images
	benchCluster = 64 << 10
)

var (
	benchPercents = []int{0, 50, 100}
	benchDepths   = []int{1, 4, 16}
)

// benchChain builds a chain of depth layers over benchSize bytes where pct % of
// the clusters hold data, spread over the layers (cluster i lives in layer
// i mod depth), and returns the top's path. Built once per configuration.
func benchChain(b *testing.B, pct, depth int) string {
	b.Helper()
	dir := b.TempDir()
	var prev string
	buf := make([]byte, benchCluster)
	rng := rand.New(rand.NewPCG(uint64(pct), uint64(depth)))
	for l := range depth {
		path := filepath.Join(dir, fmt.Sprintf("l%d.qcow2", l))
		img, err := disk.Create(path, disk.CreateOptions{Size: benchSize, ClusterSize: benchCluster, BackingFile: prev})
		if err != nil {
			b.Fatalf("create %s: %v", path, err)
		}
		for c := int64(0); c < benchSize/benchCluster; c++ {
			if int(c)%depth != l || !benchAllocated(c, pct) {
				continue
			}
			for i := 0; i < len(buf); i += 8 {
				binary.LittleEndian.PutUint64(buf[i:], rng.Uint64()|1)
			}
			if _, err := img.WriteAt(buf, c*benchCluster); err != nil {
				b.Fatal(err)
			}
		}
		if err := img.Close(); err != nil {
			b.Fatal(err)
		}
		prev = path
	}
	return prev
}

// benchAllocated spreads pct % of the clusters evenly.
func benchAllocated(c int64, pct int) bool { return (c*37)%100 < int64(pct) }

func benchOpen(b *testing.B, path string, ro bool) disk.Image {
	b.Helper()
	img, err := disk.Open(path, disk.OpenOptions{ReadOnly: ro})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { img.Close() })
	return img
}

func benchMatrix(b *testing.B, fn func(b *testing.B, top string)) {
	for _, pct := range benchPercents {
		for _, depth := range benchDepths {
			b.Run(fmt.Sprintf("%dp/depth%d", pct, depth), func(b *testing.B) {
				fn(b, benchChain(b, pct, depth))
			})
		}
	}
}

// BenchmarkReadSequential reads the whole disk in 1 MiB pieces.
func BenchmarkReadSequential(b *testing.B) {
	benchMatrix(b, func(b *testing.B, top string) {
		img := benchOpen(b, top, true)
		buf := make([]byte, 1<<20)
		b.SetBytes(benchSize)
		b.ReportAllocs()
		for b.Loop() {
			for off := int64(0); off < benchSize; off += int64(len(buf)) {
				if _, err := img.ReadAt(buf, off); err != nil {
					b.Fatal(err)
				}
			}
		}
	})
}

// BenchmarkReadRandom4K reads 4 KiB at random aligned offsets.
func BenchmarkReadRandom4K(b *testing.B) {
	benchMatrix(b, func(b *testing.B, top string) {
		img := benchOpen(b, top, true)
		buf := make([]byte, 4096)
		rng := rand.New(rand.NewPCG(1, 2))
		b.SetBytes(int64(len(buf)))
		b.ReportAllocs()
		for b.Loop() {
			if _, err := img.ReadAt(buf, rng.Int64N(benchSize/4096)*4096); err != nil {
				b.Fatal(err)
			}
		}
	})
}

// BenchmarkMapChain maps the whole chain.
func BenchmarkMapChain(b *testing.B) {
	benchMatrix(b, func(b *testing.B, top string) {
		img := benchOpen(b, top, true)
		b.ReportAllocs()
		for b.Loop() {
			if _, err := disk.MapChain(img, 0, benchSize); err != nil {
				b.Fatal(err)
			}
		}
	})
}

// BenchmarkMapChain1TiB maps a 1 TiB disk, four layers deep, with 4,000
// scattered allocated clusters.
func BenchmarkMapChain1TiB(b *testing.B) {
	dir := b.TempDir()
	const size = 1 << 40
	var prev string
	rng := rand.New(rand.NewPCG(3, 4))
	buf := make([]byte, benchCluster)
	for l := range 4 {
		path := filepath.Join(dir, fmt.Sprintf("l%d.qcow2", l))
		img, err := disk.Create(path, disk.CreateOptions{Size: size, BackingFile: prev})
		if err != nil {
			b.Fatal(err)
		}
		for range 1000 {
			if _, err := img.WriteAt(buf[:4096], rng.Int64N(size/benchCluster)*benchCluster); err != nil {
				b.Fatal(err)
			}
		}
		if err := img.Close(); err != nil {
			b.Fatal(err)
		}
		prev = path
	}
	img := benchOpen(b, prev, true)
	b.ReportAllocs()
	for b.Loop() {
		if _, err := disk.MapChain(img, 0, size); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkWriteAllocating writes whole fresh clusters into a new image.
func BenchmarkWriteAllocating(b *testing.B) {
	img, err := disk.Create(filepath.Join(b.TempDir(), "w.qcow2"), disk.CreateOptions{Size: 1 << 40})
	if err != nil {
		b.Fatal(err)
	}
	defer img.Close()
	buf := make([]byte, benchCluster)
	for i := range buf {
		buf[i] = byte(i) | 1
	}
	var off int64
	b.SetBytes(benchCluster)
	b.ReportAllocs()
	for b.Loop() {
		if _, err := img.WriteAt(buf, off); err != nil {
			b.Fatal(err)
		}
		off += benchCluster
	}
	if err := img.Flush(); err != nil {
		b.Fatal(err)
	}
}

// BenchmarkWriteCopyOnWrite4K writes 4 KiB into clusters the top does not
// hold yet, over a fully allocated backing file: each write copies the rest
// of its cluster up.
func BenchmarkWriteCopyOnWrite4K(b *testing.B) {
	base := benchChain(b, 100, 1)
	top := filepath.Join(b.TempDir(), "top.qcow2")
	img, err := disk.Create(top, disk.CreateOptions{BackingFile: base, AllowedRoots: []string{filepath.Dir(base), filepath.Dir(top)}})
	if err != nil {
		b.Fatal(err)
	}
	defer img.Close()
	buf := make([]byte, 4096)
	c := int64(0)
	b.SetBytes(4096)
	b.ReportAllocs()
	for b.Loop() {
		if c == benchSize/benchCluster {
			// every cluster copied up: start again on a fresh top
			b.StopTimer()
			img.Close()
			os.Remove(top)
			if img, err = disk.Create(top, disk.CreateOptions{BackingFile: base, AllowedRoots: []string{filepath.Dir(base), filepath.Dir(top)}}); err != nil {
				b.Fatal(err)
			}
			c = 0
			b.StartTimer()
		}
		if _, err := img.WriteAt(buf, c*benchCluster+1024); err != nil {
			b.Fatal(err)
		}
		c++
	}
}

// BenchmarkRewrite4K rewrites 4 KiB in place in clusters the image owns.
func BenchmarkRewrite4K(b *testing.B) {
	img := benchOpen(b, benchChain(b, 100, 1), false)
	buf := make([]byte, 4096)
	rng := rand.New(rand.NewPCG(5, 6))
	b.SetBytes(4096)
	b.ReportAllocs()
	for b.Loop() {
		if _, err := img.WriteAt(buf, rng.Int64N(benchSize/4096)*4096); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkConvert flattens a 50 % allocated, 4-deep chain, plain and
// compressed.
func BenchmarkConvert(b *testing.B) {
	top := benchChain(b, 50, 4)
	img := benchOpen(b, top, true)
	dir := b.TempDir()
	for _, tc := range []struct {
		name string
		opts disk.ConvertOptions
	}{
		{name: "qcow2", opts: disk.ConvertOptions{}},
		{name: "raw", opts: disk.ConvertOptions{Format: disk.FormatRaw}},
		{name: "zstd", opts: disk.ConvertOptions{Compress: "zstd"}},
		{name: "deflate", opts: disk.ConvertOptions{Compress: "deflate"}},
	} {
		b.Run(tc.name, func(b *testing.B) {
			b.SetBytes(benchSize)
			b.ReportAllocs()
			i := 0
			for b.Loop() {
				dst := filepath.Join(dir, fmt.Sprintf("%s-%d", tc.name, i))
				if err := disk.Convert(context.Background(), img, dst, tc.opts); err != nil {
					b.Fatal(err)
				}
				os.Remove(dst)
				i++
			}
		})
	}
}

// BenchmarkCheck checks a fully allocated image.
func BenchmarkCheck(b *testing.B) {
	top := benchChain(b, 100, 1)
	b.ReportAllocs()
	for b.Loop() {
		if r, err := disk.Check(top, false); err != nil || r.Corruptions+r.Leaks != 0 {
			b.Fatal(r, err)
		}
	}
}

// BenchmarkImageStrided4K reads 4 KiB at offsets i×STEP mod size of the image
// $CVD_BENCH_IMAGE (CVD_BENCH_STEP, default 4096×100003), one at a time: the
// pattern of `qemu-img bench -d 1 -s 4K -S STEP`, for scripts/bench.sh.
func BenchmarkImageStrided4K(b *testing.B) {
	path := os.Getenv("CVD_BENCH_IMAGE")
	if path == "" {
		b.Skip("CVD_BENCH_IMAGE not set (scripts/bench.sh sets it)")
	}
	step := int64(4096 * 100003)
	if s := os.Getenv("CVD_BENCH_STEP"); s != "" {
		v, err := strconv.ParseInt(s, 0, 64)
		if err != nil {
			b.Fatal(err)
		}
		step = v
	}
	img, err := disk.Open(path, disk.OpenOptions{ReadOnly: true})
	if err != nil {
		b.Fatal(err)
	}
	defer img.Close()
	buf := make([]byte, 4096)
	size := img.Size()
	var off int64
	b.SetBytes(4096)
	b.ReportAllocs()
	for b.Loop() {
		if _, err := img.ReadAt(buf, off); err != nil {
			b.Fatal(err)
		}
		off = (off + step) % size
	}
}
