package ordered

import (
	"context"
	"errors"
	"math/rand/v2"
	"sync/atomic"
	"testing"
	"time"
)

type item struct {
	in, out int
}

func TestOrder(t *testing.T) {
	tests := []struct {
		name           string
		workers, depth int
		n              int
	}{
		{"one worker", 1, 1, 100},
		{"several", 4, 16, 1000},
		{"depth below workers", 8, 2, 500},
		{"nothing", 4, 8, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var inFlight, most atomic.Int64
			next := 0
			err := Run(context.Background(), tt.workers, tt.depth,
				func(_ context.Context, submit func(*item, bool) error) error {
					for i := range tt.n {
						if n := inFlight.Add(1); n > most.Load() {
							most.Store(n)
						}
						if err := submit(&item{in: i}, i%7 == 0); err != nil {
							return err
						}
					}
					return nil
				},
				func(it *item) {
					time.Sleep(time.Duration(rand.IntN(50)) * time.Microsecond)
					it.out = it.in * 2
				},
				func(it *item) error {
					inFlight.Add(-1)
					if it.in != next {
						t.Fatalf("consumed %d, want %d", it.in, next)
					}
					if it.in%7 != 0 && it.out != it.in*2 {
						t.Fatalf("item %d: work not done", it.in)
					}
					if it.in%7 == 0 && it.out != 0 {
						t.Fatalf("item %d: skipped item was worked on", it.in)
					}
					next++
					return nil
				})
			if err != nil || next != tt.n {
				t.Fatalf("consumed %d of %d: %v", next, tt.n, err)
			}
			if limit := int64(max(tt.depth, tt.workers) + max(tt.workers, 1) + 2); most.Load() > limit {
				t.Errorf("%d items in flight, more than the depth allows (%d)", most.Load(), limit)
			}
		})
	}
}

func TestErrorsStop(t *testing.T) {
	boom := errors.New("boom")
	t.Run("consume", func(t *testing.T) {
		var produced atomic.Int64
		err := Run(context.Background(), 4, 8,
			func(_ context.Context, submit func(*item, bool) error) error {
				for i := 0; ; i++ {
					if err := submit(&item{in: i}, false); err != nil {
						return err
					}
					produced.Add(1)
				}
			},
			func(*item) {},
			func(it *item) error {
				if it.in == 10 {
					return boom
				}
				return nil
			})
		if !errors.Is(err, boom) {
			t.Fatalf("err %v", err)
		}
		if produced.Load() > 100 {
			t.Errorf("produce went on for %d items after consume failed", produced.Load())
		}
	})
	t.Run("produce", func(t *testing.T) {
		n := 0
		err := Run(context.Background(), 2, 4,
			func(_ context.Context, submit func(*item, bool) error) error {
				for i := range 5 {
					if err := submit(&item{in: i}, false); err != nil {
						return err
					}
				}
				return boom
			},
			func(*item) {},
			func(*item) error { n++; return nil })
		if !errors.Is(err, boom) || n != 5 {
			t.Fatalf("err %v after %d items", err, n)
		}
	})
	t.Run("context", func(t *testing.T) {
		ctx, cancel := context.WithCancel(context.Background())
		err := Run(ctx, 2, 4,
			func(_ context.Context, submit func(*item, bool) error) error {
				for i := 0; ; i++ {
					if i == 20 {
						cancel()
					}
					if err := submit(&item{in: i}, false); err != nil {
						return err
					}
				}
			},
			func(*item) {},
			func(*item) error { return nil })
		if !errors.Is(err, context.Canceled) {
			t.Fatalf("err %v", err)
		}
	})
}
