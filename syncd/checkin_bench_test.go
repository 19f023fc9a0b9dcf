package syncd

import (
	"context"
	"math/rand/v2"
	"syscall"
	"testing"

	"github.com/cvd-project/cvd/syncd/laptop"

	"github.com/cvd-project/cvd/disk"
	"github.com/cvd-project/cvd/internal/testutil"
	"github.com/cvd-project/cvd/syncd/proto"
)

// BenchmarkCheckin is the sync row of make bench in-process: a 16 GiB disk, 64
// MiB of new random data in 64 writes of 1 MiB scattered over it, checked in over
// loopback HTTP. Each iteration writes new data (outside the timer) and checks it
// in; b.SetBytes makes the MB/s column the throughput of changed data.
func BenchmarkCheckin(b *testing.B) {
	const size = 16 << 30
	w := newWorld(b, worldSpec{baseSize: size,
		baseWrites: []write{{off: 0, data: testutil.Fill(1, 8<<20, false)}},
		appWrites:  []write{{off: 4 << 30, data: testutil.Fill(2, 4<<20, false)}}})
	lap := newLaptop(b, "laptop")
	ctx := context.Background()
	if _, err := lap.lp.CheckOut(ctx, w.client(w.token), w.desktop, laptop.CheckoutOptions{}); err != nil {
		b.Fatal(err)
	}
	top := lap.top(w.desktop, proto.DiskSystem)
	rng := rand.New(rand.NewPCG(7, 7))
	b.SetBytes(64 << 20)
	b.ResetTimer()
	for i := 0; b.Loop(); i++ {
		b.StopTimer()
		img, err := disk.Open(top, disk.OpenOptions{AllowedRoots: []string{lap.dir}})
		if err != nil {
			b.Fatal(err)
		}
		for _, mb := range rng.Perm(16 << 10)[:64] {
			if _, err := img.WriteAt(testutil.Fill(uint64(i)<<20|uint64(mb), 1<<20, false), int64(mb)<<20); err != nil {
				b.Fatal(err)
			}
		}
		if err := img.Close(); err != nil {
			b.Fatal(err)
		}
		syscall.Sync() // as the bench script: no writeback of the new data during the check-in
		b.StartTimer()
		rep, err := lap.lp.CheckIn(ctx, w.desktop, laptop.CheckinOptions{})
		if err != nil {
			b.Fatal(err)
		}
		if rep.Sent != 1024 {
			b.Fatalf("sent %d clusters, want 1024", rep.Sent)
		}
	}
}
