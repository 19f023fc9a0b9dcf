package vm

import (
	"context"
	"sync"
	"time"

	"github.com/cvd-project/cvd/hypervisor"
)

// Outcome is what became of one domain of a Provision.
type Outcome struct {
	// RunningAt is the time from the Provision's start until the domain ran (or
	// was defined, with NoStart); 0 on failure.
	RunningAt     time.Duration
	State, Reason string
	Err           error
}

// ProvisionTiming sums what the workers spent defining and starting.
type ProvisionTiming struct {
	Define, Start time.Duration
}

// ProvisionOptions controls Provision.
type ProvisionOptions struct {
	// Parallel is how many domains are defined and started at once (at least 1).
	Parallel int
	// NoStart defines the domains and starts none.
	NoStart bool
}

// Provision defines (and starts) the domains of specs on conn, opts.Parallel at
// a time, and reports each one's outcome in the order of specs. One domain's
// failure does not stop the others.
func Provision(ctx context.Context, conn *hypervisor.Conn, specs []hypervisor.DomainSpec, opts ProvisionOptions) ([]Outcome, ProvisionTiming) {
	t0 := time.Now()
	out := make([]Outcome, len(specs))
	var (
		mu     sync.Mutex
		timing ProvisionTiming
		wg     sync.WaitGroup
		next   = make(chan int)
	)
	for w := 0; w < min(max(opts.Parallel, 1), len(specs)); w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range next {
				o := &out[i]
				name := specs[i].Name
				t := time.Now()
				err := conn.Define(ctx, specs[i])
				d := time.Since(t)
				var s time.Duration
				if err == nil && !opts.NoStart {
					t = time.Now()
					err = conn.Start(ctx, name)
					s = time.Since(t)
				}
				if err == nil {
					o.RunningAt = time.Since(t0)
					var st hypervisor.Status
					if st, err = conn.Status(ctx, name); err == nil {
						o.State, o.Reason = st.State.String(), st.Reason
					}
				}
				if err != nil {
					o.Err, o.RunningAt = err, 0
				}
				mu.Lock()
				timing.Define += d
				timing.Start += s
				mu.Unlock()
			}
		}()
	}
	for i := range specs {
		next <- i
	}
	close(next)
	wg.Wait()
	return out, timing
}
