// Command cvd is the block-level virtual disk and linked-clone engine's CLI.
package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"syscall"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := newRootCommand().ExecuteContext(ctx)
	stop()
	if err != nil {
		var ee *exitError
		if !(errors.As(err, &ee) && ee.quiet) {
			fmt.Fprintln(os.Stderr, "cvd:", err)
		}
	}
	os.Exit(exitCode(err))
}
