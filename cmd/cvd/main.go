// Command cvd is the block-level virtual disk and linked-clone engine's CLI.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"runtime/pprof"
	"slices"
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
	g := &globalOptions{}
	err := newRootCommandWith(g).ExecuteContext(ctx)
	stop()
	if err != nil {
		var ee *exitError
		if !(errors.As(err, &ee) && ee.quiet) {
			printError(os.Stderr, err, g.json || slices.Contains(os.Args[1:], "--json"))
		}
	}
	if prof != nil {
		pprof.StopCPUProfile()
		prof.Close()
	}
	os.Exit(exitCode(err))
}

// printError writes a command's error to stderr: a line of text, or with --json
// one JSON object {"error": message, "exit_code": N} that a script can read.
func printError(w io.Writer, err error, asJSON bool) {
	if !asJSON {
		fmt.Fprintln(w, "cvd:", err)
		return
	}
	json.NewEncoder(w).Encode(struct {
		Error    string `json:"error"`
		ExitCode int    `json:"exit_code"`
	}{err.Error(), exitCode(err)})
}
