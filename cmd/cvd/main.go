// Command cvd is the block-level virtual disk and linked-clone engine's CLI.
package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"runtime/pprof"
	"syscall"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	// CVD_CPUPROFILE=FILE writes a CPU profile of the command (for developers:
	// go tool pprof bin/cvd FILE).
	var prof *os.File
	if p := os.Getenv("CVD_CPUPROFILE"); p != "" {
		if f, err := os.Create(p); err == nil && pprof.StartCPUProfile(f) == nil {
			prof = f
		}
	}
	err := newRootCommand().ExecuteContext(ctx)
	stop()
	if err != nil {
		var ee *exitError
		if !(errors.As(err, &ee) && ee.quiet) {
			fmt.Fprintln(os.Stderr, "cvd:", err)
		}
	}
	if prof != nil {
		pprof.StopCPUProfile()
		prof.Close()
	}
	os.Exit(exitCode(err))
}
