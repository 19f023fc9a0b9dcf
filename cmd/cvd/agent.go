package main

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"time"

	"github.com/cvd-project/cvd/syncd/laptop"

	"github.com/spf13/cobra"

	"github.com/cvd-project/cvd/vm"
)

type agentOptions struct {
	interval     time.Duration
	checkinEvery time.Duration
	renewWithin  time.Duration
	once         bool
}

func newAgentCommand(g *globalOptions) *cobra.Command {
	opts := &agentOptions{}
	c := &cobra.Command{
		Use:   "agent",
		Short: "Keep this device's desktops in order: purge, renew, hand over, stage, check in, run when asked",
		Long: `The device's agent. Every --interval it purges the copies whose lease has
expired (offline too: the server is not needed), renews the leases of the others
when they come within --renew-within of their expiry, and checks a desktop in
when its last check-in is older than --checkin-every. In a desktop's device
group it also hands the active role over when another device asks for it
(syncing up first), stages a newer head (applied at once while the VM is down),
pushes an inactive device's user disk, and on the data-center host opens and
starts a desktop that a user asked to run there (cvd open --remote), reporting
its console address. A server that cannot be reached is reported and retried at
the next round. The store is open only during a round, so other cvd commands can
run in between. CVD_VNC_LISTEN gives the desktops' VMs a VNC console on that
address (a data-center host's).`,
		Example: `  cvd agent --store ~/cvd --interval 5m --checkin-every 1h
  cvd agent --once --json`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			return runAgent(cmd.Context(), g, opts, cmd.OutOrStdout(), cmd.ErrOrStderr())
		},
	}
	f := c.Flags()
	f.DurationVar(&opts.interval, "interval", 5*time.Minute, "time between rounds")
	f.DurationVar(&opts.checkinEvery, "checkin-every", time.Hour, "check a desktop in when its last check-in is older (0: never)")
	f.DurationVar(&opts.renewWithin, "renew-within", 0, "renew a lease only when it expires sooner than this (0: every round)")
	f.BoolVar(&opts.once, "once", false, "do one round and exit")
	return c
}

func runAgent(ctx context.Context, g *globalOptions, opts *agentOptions, out, errOut io.Writer) error {
	ao := laptop.AgentOptions{CheckinEvery: opts.checkinEvery, RenewWithin: opts.renewWithin, Logger: slog.Default(),
		VNCListen: os.Getenv("CVD_VNC_LISTEN"),
		StartStream: func(ctx context.Context, lp *laptop.Laptop, desktop string) error {
			_, err := startStream(ctx, g, lp, desktop)
			return err
		}}
	if uri := vm.HookURI(""); uri != "" {
		vms := &vm.Desktops{URI: uri, Log: slog.Default()}
		defer vms.Close()
		ao.VM, ao.Running = vms, vms.Running
	}
	for {
		evs, err := laptop.AgentCycle(ctx, g.store, ao)
		if g.json {
			if evs == nil {
				evs = []laptop.AgentEvent{}
			}
			printJSON(out, struct {
				Time   time.Time           `json:"time"`
				Events []laptop.AgentEvent `json:"events"`
				Error  string              `json:"error,omitempty"`
			}{time.Now().UTC(), evs, errString(err)})
		} else {
			for _, e := range evs {
				fmt.Fprintf(out, "%s %s %s %s\n", time.Now().Format(time.RFC3339), e.Desktop, e.Action, e.Detail)
			}
			if err != nil {
				fmt.Fprintf(errOut, "cvd agent: %v\n", err)
			}
		}
		if opts.once {
			return err
		}
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(opts.interval):
		}
	}
}

func errString(err error) string {
	if err == nil {
		return ""
	}
	return err.Error()
}
