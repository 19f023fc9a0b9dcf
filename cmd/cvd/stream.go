package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"github.com/cvd-project/cvd/syncd/laptop"
)

func newStreamCommand(g *globalOptions) *cobra.Command {
	c := &cobra.Command{
		Use:   "stream",
		Short: "Serve, stop or switch a streamed desktop (cvd checkout --stream)",
		Long: `A desktop checked out with --stream runs before its layers have arrived: a
stream process of this store serves each disk's read-only chain to QEMU as an
NBD export on a unix socket, fetches what the guest reads and is missing ahead
of everything else, and fills the rest in the background (or, with a cache
budget, keeps only what was read last). cvd checkout --stream and cvd agent
start it; these commands run, stop and finish it by hand.`,
		Example: `  cvd stream serve alice          # in the foreground (what checkout starts in the background)
  cvd stream stop alice
  cvd stream switch alice         # every layer arrived, VM down: run on the local files`,
	}
	c.AddCommand(newStreamServeCommand(g), newStreamStopCommand(g), newStreamSwitchCommand(g))
	return c
}

func newStreamServeCommand(g *globalOptions) *cobra.Command {
	var cfg laptop.StreamConfig
	c := &cobra.Command{
		Use:   "serve DESKTOP",
		Short: "Serve a streamed desktop's NBD exports and fetch its layers, in the foreground",
		Long: `Serve the streamed desktop's read-only chains on its NBD socket until stopped
(SIGTERM or cvd stream stop): a read of a missing cluster is fetched from the
server at once and fails with an I/O error after --read-timeout when the server
does not answer (the fetch is retried in the background); the working set the
server knows for the desktop's layers comes first, then the rest, unless a
cache budget holds the copy to what was read. The clusters read in the first
--working-window are reported as the layers' working set.`,
		Example: `  cvd stream serve alice --read-timeout 30s`,
		Args:    cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			lp, done, err := openLaptop(g, cmd.ErrOrStderr())
			if err != nil {
				return err
			}
			defer done()
			ctx, stop := signal.NotifyContext(cmd.Context(), syscall.SIGTERM, os.Interrupt)
			defer stop()
			return storeError(lp.ServeStream(ctx, args[0], laptop.ServeOptions{StreamConfig: cfg}))
		},
	}
	f := c.Flags()
	f.DurationVar(&cfg.ReadTimeout, "read-timeout", 0, "how long a guest read waits for a missing cluster before it fails (default: as checked out, else 20s)")
	f.DurationVar(&cfg.WorkingWindow, "working-window", 3*time.Minute, "how long after the start first reads count as the working set")
	f.BoolVar(&cfg.NoBackground, "no-background", false, "fetch only what is read (and the working set)")
	return c
}

func newStreamStopCommand(g *globalOptions) *cobra.Command {
	return &cobra.Command{
		Use:     "stop DESKTOP",
		Short:   "Stop a streamed desktop's stream process (its VM loses its disks: shut it down first)",
		Example: `  cvd stream stop alice`,
		Args:    cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			lp, done, err := openLaptop(g, cmd.ErrOrStderr())
			if err != nil {
				return err
			}
			defer done()
			return lp.StopStream(args[0], 30*time.Second)
		},
	}
}

func newStreamSwitchCommand(g *globalOptions) *cobra.Command {
	return &cobra.Command{
		Use:   "switch DESKTOP",
		Short: "Move a streamed desktop whose layers have all arrived onto the local files (VM down)",
		Long: `Stop the desktop's stream process and move its tops onto the store's copies of
the layers: what the guest wrote stays, the VM is redefined on the local chain,
and the desktop is an ordinary check-out from then on (cvd checkin works).
cvd agent does this by itself at the desktop's next start.`,
		Example: `  cvd stream switch alice`,
		Args:    cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			lp, done, err := openLaptop(g, cmd.ErrOrStderr())
			if err != nil {
				return err
			}
			defer done()
			if err := lp.StopStream(args[0], 30*time.Second); err != nil {
				return err
			}
			return storeError(lp.SwitchStream(cmd.Context(), args[0]))
		},
	}
}

// startStream starts the desktop's stream process in the background (its own
// session, its output in the stream directory) and waits until it serves.
func startStream(ctx context.Context, g *globalOptions, lp *laptop.Laptop, desktop string) (int, error) {
	if st, err := lp.StreamState(desktop); err == nil && st.Running {
		return st.PID, nil
	}
	exe, err := os.Executable()
	if err != nil {
		return 0, err
	}
	args := []string{"--store", g.store, "--log-level", "info"}
	if g.catalog != "" {
		args = append(args, "--catalog", g.catalog)
	}
	args = append(args, "stream", "serve", desktop)
	logPath := filepath.Join(lp.StreamDir(desktop), "stream.log")
	logf, err := os.OpenFile(logPath, os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o644)
	if err != nil {
		return 0, err
	}
	defer logf.Close()
	cmd := exec.Command(exe, args...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		return 0, err
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	deadline := time.NewTimer(30 * time.Second)
	defer deadline.Stop()
	for {
		if st, err := lp.StreamState(desktop); err == nil && st.Running && st.PID == cmd.Process.Pid {
			return st.PID, nil
		}
		select {
		case err := <-exited:
			return 0, fmt.Errorf("the stream process of %s ended at once (%v): %s", desktop, err, tail(logPath))
		case <-deadline.C:
			return 0, fmt.Errorf("the stream process of %s did not start serving within 30 s: %s", desktop, tail(logPath))
		case <-ctx.Done():
			return 0, ctx.Err()
		case <-time.After(10 * time.Millisecond):
		}
	}
}

// tail is the last lines of a log file.
func tail(path string) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return err.Error()
	}
	lines := strings.Split(strings.TrimSpace(string(b)), "\n")
	return strings.Join(lines[max(0, len(lines)-5):], "\n")
}

func newPinCommand(g *globalOptions) *cobra.Command {
	var wait bool
	c := &cobra.Command{
		Use:   "pin DESKTOP",
		Short: "Fetch all of a streamed desktop before going offline",
		Long: `Pin a streamed desktop: its stream fetches every cluster, whatever its cache
budget, and each layer goes into the store as it completes. With --wait the
command shows the progress and returns once everything is local; when the
desktop's VM is down it then switches to the local files at once (otherwise at
its next start). A desktop checked out in full is pinned already.`,
		Example: `  cvd pin alice --wait
  cvd pin alice --json`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			lp, done, err := openLaptop(g, cmd.ErrOrStderr())
			if err != nil {
				return err
			}
			defer done()
			name := args[0]
			co, err := lp.Pin(name)
			if err != nil {
				return storeError(err)
			}
			out := cmd.OutOrStdout()
			if co.Stream == nil {
				if g.json {
					return printJSON(out, map[string]any{"desktop": name, "complete": true})
				}
				fmt.Fprintf(out, "%s is checked out in full: everything is local\n", name)
				return nil
			}
			if _, err := startStream(cmd.Context(), g, lp, name); err != nil {
				return err
			}
			st, err := waitPinned(cmd.Context(), lp, name, wait, cmd.ErrOrStderr())
			if err != nil {
				return err
			}
			switched := false
			if st.Complete && !lp.VMRunning(cmd.Context(), name) {
				if err := lp.StopStream(name, 30*time.Second); err != nil {
					return err
				}
				if err := lp.SwitchStream(cmd.Context(), name); err != nil {
					return storeError(err)
				}
				switched = true
			}
			if g.json {
				return printJSON(out, map[string]any{"desktop": name, "complete": st.Complete, "local_bytes": st.LocalBytes,
					"total_bytes": st.TotalBytes, "switched": switched})
			}
			fmt.Fprintf(out, "%s pinned: %s of %s local\n", name, fmtBytes(st.LocalBytes), fmtBytes(st.TotalBytes))
			if switched {
				fmt.Fprintf(out, "  every layer arrived; the desktop now runs on its local files\n")
			} else if st.Complete {
				fmt.Fprintf(out, "  every layer arrived; the desktop switches to its local files at its next start\n")
			}
			return nil
		},
	}
	c.Flags().BoolVar(&wait, "wait", false, "wait until everything is local")
	return c
}

// waitPinned returns the stream's state, after everything arrived when wait.
func waitPinned(ctx context.Context, lp *laptop.Laptop, name string, wait bool, errOut io.Writer) (*laptop.StreamStatus, error) {
	var p laptop.Progress
	var shown int64
	defer func() {
		if p != nil {
			p.Done()
		}
	}()
	for {
		st, err := lp.StreamState(name)
		if err != nil {
			return nil, err
		}
		if !wait || st.Complete {
			return st, nil
		}
		if !st.Running {
			return nil, errors.New("the stream process stopped before every layer arrived: " + tail(filepath.Join(lp.StreamDir(name), "stream.log")))
		}
		if p == nil {
			p = newProgress(errOut)
			if p != nil {
				p.Start("pin "+name, st.TotalBytes)
			}
		}
		if p != nil && st.LocalBytes > shown {
			p.Add(st.LocalBytes - shown)
			shown = st.LocalBytes
		}
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(time.Second):
		}
	}
}
