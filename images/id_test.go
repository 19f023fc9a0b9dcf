package images

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"slices"
	"testing"

	"github.com/cvd-project/cvd/disk"
)

// fakeImage is a disk.Image whose layer map is given; bytes read are the byte
// offset's cluster index + 1 (so every cluster is non-zero) except in zeroAt.
type fakeImage struct {
	size   int64
	exts   []disk.Extent
	zeroAt map[int64]bool // clusters (of 64 KiB) that read as zeros
}

func (f *fakeImage) ReadAt(p []byte, off int64) (int, error) {
	for i := range p {
		c := (off + int64(i)) / 65536
		if f.zeroAt[c] {
			p[i] = 0
		} else {
			p[i] = byte(c%251 + 1)
		}
	}
	return len(p), nil
}
func (f *fakeImage) WriteAt(p []byte, off int64) (int, error) { return 0, disk.ErrReadOnly }
func (f *fakeImage) Close() error                             { return nil }
func (f *fakeImage) Info() disk.Info {
	return disk.Info{Format: disk.FormatQcow2, ClusterSize: 65536, Size: f.size}
}
func (f *fakeImage) Size() int64                    { return f.size }
func (f *fakeImage) Backing() disk.Image            { return nil }
func (f *fakeImage) WriteZeroes(int64, int64) error { return disk.ErrReadOnly }
func (f *fakeImage) Discard(int64, int64) error     { return disk.ErrReadOnly }
func (f *fakeImage) Flush() error                   { return nil }
func (f *fakeImage) MapLayer(off, n int64) ([]disk.Extent, error) {
	var out []disk.Extent
	for _, e := range f.exts {
		lo, hi := max(e.Off, off), min(e.Off+e.Len, off+n)
		if lo < hi {
			out = append(out, disk.Extent{Off: lo, Len: hi - lo, State: e.State})
		}
	}
	return out, nil
}

var _ disk.Image = (*fakeImage)(nil)

func TestWalkLayer(t *testing.T) {
	const c = 65536
	ext := func(off, n int64, s disk.State) disk.Extent { return disk.Extent{Off: off, Len: n, State: s} }
	tests := []struct {
		name     string
		size     int64
		exts     []disk.Extent
		zeroAt   []int64
		keepZero bool
		want     []string // "idx:d" or "idx:z"
	}{
		{"whole clusters", 10 * c, []disk.Extent{ext(0, 2*c, disk.Data), ext(4*c, c, disk.Zero), ext(5*c, c, disk.Data)}, nil, true,
			[]string{"0:d", "1:d", "4:z", "5:d"}},
		{"zeros dropped without parent", 10 * c, []disk.Extent{ext(0, 2*c, disk.Data), ext(4*c, c, disk.Zero), ext(5*c, c, disk.Data)}, nil, false,
			[]string{"0:d", "1:d", "5:d"}},
		{"all-zero data is zero", 4 * c, []disk.Extent{ext(0, 3*c, disk.Data)}, []int64{1}, true,
			[]string{"0:d", "1:z", "2:d"}},
		{"sub-cluster extents: data wins", 4 * c, []disk.Extent{ext(0, 512, disk.Zero), ext(512, 512, disk.Data), ext(1024, c, disk.Zero)}, nil, true,
			[]string{"0:d", "1:z"}},
		{"sub-cluster extents: zero then data in a later cluster", 4 * c, []disk.Extent{ext(0, c+512, disk.Zero), ext(c+512, 512, disk.Data)}, nil, true,
			[]string{"0:z", "1:d"}},
		{"data then zero sharing a cluster", 4 * c, []disk.Extent{ext(0, c+512, disk.Data), ext(c+512, 2*c-512, disk.Zero)}, nil, true,
			[]string{"0:d", "1:d", "2:z"}},
		{"partial last cluster", c + 4096, []disk.Extent{ext(c, 4096, disk.Data)}, nil, true,
			[]string{"1:d"}},
		{"across the map window", 3 << 30, []disk.Extent{ext(1<<30-c, 2*c, disk.Data)}, nil, true,
			[]string{fmt.Sprintf("%d:d", (1<<30)/c-1), fmt.Sprintf("%d:d", (1<<30)/c)}},
		// Many read chunks, runs of both kinds between them: SumLayer's order.
		{"many chunks", 64 << 20, []disk.Extent{ext(0, 9<<20, disk.Data), ext(9<<20, 3<<20, disk.Zero),
			ext(12<<20, c, disk.Data), ext(20<<20, 30<<20+4096, disk.Data)}, []int64{5, 100, 399}, true, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := &fakeImage{size: tt.size, exts: tt.exts, zeroAt: map[int64]bool{}}
			for _, z := range tt.zeroAt {
				f.zeroAt[z] = true
			}
			var got []string
			var sizes []int
			err := WalkLayer(context.Background(), f, c, tt.keepZero, func(idx int64, data []byte) error {
				s := "d"
				if data == nil {
					s = "z"
				} else {
					sizes = append(sizes, len(data))
				}
				got = append(got, fmt.Sprintf("%d:%s", idx, s))
				return nil
			})
			if err != nil {
				t.Fatal(err)
			}
			if tt.want != nil && !slices.Equal(got, tt.want) {
				t.Errorf("got %v, want %v", got, tt.want)
			}
			// SumLayer lists the same clusters, in order, with their digests.
			var want []ClusterSum
			WalkLayer(context.Background(), f, c, tt.keepZero, func(idx int64, data []byte) error {
				s := ClusterSum{Index: idx, Zero: data == nil, Len: len(data)}
				if data != nil {
					s.Digest = sha256.Sum256(data)
				}
				want = append(want, s)
				return nil
			})
			var sums []ClusterSum
			err = SumLayer(context.Background(), f, c, tt.keepZero, func(s ClusterSum) error {
				sums = append(sums, s)
				return nil
			})
			if err != nil {
				t.Fatal(err)
			}
			if !slices.Equal(sums, want) {
				t.Errorf("SumLayer listed %d clusters unlike WalkLayer's %d", len(sums), len(want))
			}
			if tt.name == "partial last cluster" && (len(sizes) != 1 || sizes[0] != 4096) {
				t.Errorf("last cluster read %v bytes, want 4096", sizes)
			}
		})
	}
}

// TestComputeIDInputs: every input of the recipe changes the ID.
func TestComputeIDInputs(t *testing.T) {
	const c = 65536
	base := func() *fakeImage {
		return &fakeImage{size: 8 * c, exts: []disk.Extent{{Off: 0, Len: c, State: disk.Data}, {Off: 2 * c, Len: c, State: disk.Zero}}, zeroAt: map[int64]bool{}}
	}
	id := func(f *fakeImage, parent string) string {
		s, _, err := ComputeID(context.Background(), f, parent)
		if err != nil {
			t.Fatal(err)
		}
		return s
	}
	ref := id(base(), "p")
	seen := map[string]string{ref: "reference"}
	variants := map[string]string{
		"other parent": id(base(), "q"),
		"no parent":    id(base(), ""),
		"other size":   func() string { f := base(); f.size = 9 * c; return id(f, "p") }(),
		"other data":   func() string { f := base(); f.exts[0].Off = c; return id(f, "p") }(),
		"no zero":      func() string { f := base(); f.exts = f.exts[:1]; return id(f, "p") }(),
	}
	for name, v := range variants {
		if prev, ok := seen[v]; ok {
			t.Errorf("%s has the same ID as %s", name, prev)
		}
		seen[v] = name
	}
	if again := id(base(), "p"); again != ref {
		t.Error("ComputeID is not deterministic")
	}
}

// TestSumLayerStops: an error from fn ends the walk with that error (the reader
// and the hashers stop with it), and so does a cancelled context.
func TestSumLayerStops(t *testing.T) {
	f := &fakeImage{size: 256 << 20, exts: []disk.Extent{{Off: 0, Len: 200 << 20, State: disk.Data}}}
	stop := errors.New("stop")
	n := 0
	err := SumLayer(context.Background(), f, 65536, true, func(ClusterSum) error {
		if n++; n == 3 {
			return stop
		}
		return nil
	})
	if !errors.Is(err, stop) || n != 3 {
		t.Fatalf("err %v after %d clusters, want stop after 3", err, n)
	}
	ctx, cancel := context.WithCancel(context.Background())
	n = 0
	err = SumLayer(ctx, f, 65536, true, func(ClusterSum) error {
		if n++; n == 2 {
			cancel()
		}
		return nil
	})
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("err %v after a cancel, want context.Canceled", err)
	}
}
