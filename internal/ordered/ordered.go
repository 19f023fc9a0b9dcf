// Package ordered runs work on several goroutines and hands the results on in
// the order the work was submitted: the one pipeline that reads ahead, hashes,
// compresses or compares on every CPU while its consumer sees one ordered
// stream.
//
// # Words
//
//   - Item: a value of the caller's type that carries a piece of work's input
//     (set by produce) and its output (set by work).
//   - Depth: how many items may be submitted and not yet consumed; with the
//     caller's buffers inside the items, it bounds the memory.
package ordered

import (
	"context"
	"sync"
)

type slot[T any] struct {
	item *T
	skip bool // no work: handed on as submitted
	done chan struct{}
}

// Run calls produce, which submits items (and waits, for anything else it
// waits on, on the context it is given: the pipeline's, cancelled when the
// pipeline stops); work runs on each submitted item on one
// of workers goroutines (at least 1), and consume receives the items in the order
// they were submitted, each once its work is done. At most depth items (at least
// workers) are submitted and not yet consumed. An item submitted with skip is
// consumed without work.
//
// The first error of produce or consume stops the pipeline: submit then
// returns it (or the context's error), the items in flight are dropped, and Run
// returns it once every goroutine has ended. A cancelled ctx stops it the same
// way. work keeps its own errors in the item, for consume to see in order.
func Run[T any](ctx context.Context, workers, depth int, produce func(ctx context.Context, submit func(item *T, skip bool) error) error,
	work func(*T), consume func(*T) error) error {
	workers = max(workers, 1)
	depth = max(depth, workers)
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	jobs := make(chan *slot[T], max(workers, depth/2))
	order := make(chan *slot[T], depth)
	var wg sync.WaitGroup
	for range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for s := range jobs {
				work(s.item)
				close(s.done)
			}
		}()
	}
	prodErr := make(chan error, 1)
	go func() {
		defer close(jobs)
		defer close(order)
		prodErr <- produce(ctx, func(item *T, skip bool) error {
			s := &slot[T]{item: item, skip: skip, done: make(chan struct{})}
			select {
			case order <- s:
			case <-ctx.Done():
				return ctx.Err()
			}
			if skip {
				close(s.done)
				return nil
			}
			select {
			case jobs <- s:
				return nil
			case <-ctx.Done():
				close(s.done)
				return ctx.Err()
			}
		})
	}()
	var err error
	for s := range order {
		<-s.done
		if err == nil {
			if err = consume(s.item); err != nil {
				cancel()
			}
		}
	}
	wg.Wait()
	if perr := <-prodErr; err == nil {
		err = perr
	}
	if err == nil {
		err = ctx.Err()
	}
	return err
}
