package main

import (
	"errors"
	"fmt"
	"time"

	"github.com/spf13/cobra"

	"github.com/cvd-project/cvd/syncd/laptop"
	"github.com/cvd-project/cvd/syncd/proto"
)

func newOpenCommand(g *globalOptions) *cobra.Command {
	f := &serverFlags{}
	var o laptop.OpenOptions
	var remote bool
	var on string
	c := &cobra.Command{
		Use:   "open DESKTOP [--local | --remote [--on DEVICE]] [--server URL --token T]",
		Short: "Run a desktop here (--local: this device becomes the active one) or in the data center (--remote)",
		Long: `Open a desktop on this device. When another device of its group is active,
this device's current state is first kept on the server as a snapshot version
(for rollback), then the active device is told to sync up and step down (its
agent sees it at its next poll); after --wait its lease is broken and its later
check-in is kept as a conflict version, so nothing is lost. Then this device
checks the head out and becomes the active device: it alone pushes system disk
versions. The server refuses a change of the role within its minimum interval
(cvd serve --min-role-interval) unless --force is given.

On a device that is active already, a staged update is applied (the VM must be
down). --start starts the desktop's VM here afterwards.

--remote runs the desktop on the data-center host of its group instead (--on
names another device): this device syncs up (an active one checks in and steps
down), the host's agent opens the desktop, starts its VM and reports its console
address, which is printed (VNC; the host's agent runs with CVD_VNC_LISTEN).

The server and token are those of the desktop's record on this store, or
--server and --token.`,
		Example: `  cvd open alice --store ~/cvd
  cvd open alice --server https://cvd.example:8470 --token "$TOKEN" --wait 5m --json
  cvd open alice --remote`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			lp, done, err := openLaptop(g, cmd.ErrOrStderr())
			if err != nil {
				return err
			}
			defer done()
			name := args[0]
			if f.server == "" {
				co, err := lp.Checkout(name)
				if errors.Is(err, proto.ErrNotCheckedOut) {
					return &exitError{code: exitUsage, err: fmt.Errorf("desktop %s is not on this store: give --server and --token", name)}
				} else if err != nil {
					return err
				}
				f.server, f.caCert = co.Server, co.CACert
				if f.token == "" {
					f.token = co.Token
				}
			}
			c, err := f.client()
			if err != nil {
				return err
			}
			if remote || on != "" {
				rr, err := lp.OpenRemote(cmd.Context(), c, name, laptop.RemoteOptions{On: on, Wait: o.Wait})
				if err != nil {
					return storeError(err)
				}
				if g.json {
					return printJSON(cmd.OutOrStdout(), rr)
				}
				if rr.SyncedUp != 0 {
					fmt.Fprintf(cmd.OutOrStdout(), "%s: this device's changes pushed as version %d\n", name, rr.SyncedUp)
				}
				fmt.Fprintf(cmd.OutOrStdout(), "%s: runs on %s; console %s\n", name, rr.Device, rr.Console)
				return nil
			}
			rep, err := lp.Open(cmd.Context(), c, name, o)
			if err != nil {
				return storeError(err)
			}
			out := cmd.OutOrStdout()
			if g.json {
				return printJSON(out, rep)
			}
			switch {
			case rep.AlreadyActive && rep.Applied && rep.Started:
				fmt.Fprintf(out, "%s: active here already; the staged update was applied and its VM started\n", name)
			case rep.AlreadyActive && rep.Started:
				fmt.Fprintf(out, "%s: active here already; its VM started\n", name)
			case rep.AlreadyActive && rep.Applied:
				fmt.Fprintf(out, "%s: active here already; the staged update was applied\n", name)
			case rep.AlreadyActive:
				fmt.Fprintf(out, "%s: active here already\n", name)
			default:
				if rep.Snapshot != 0 {
					fmt.Fprintf(out, "%s: this device's state kept as snapshot version %d\n", name, rep.Snapshot)
				}
				if rep.Previous != "" {
					how := "synced up and stepped down"
					if rep.Broken {
						how = "did not answer within the wait: its lease was broken (its later check-in becomes a conflict version)"
					}
					fmt.Fprintf(out, "%s: device %s %s\n", name, rep.Previous, how)
				}
				fmt.Fprintf(out, "%s: active on this device at version %d (%d layers fetched, %s received)\n", name,
					rep.Checkout.Version, len(rep.Checkout.LayersFetched), fmtBytes(rep.Checkout.Bytes))
				if rep.Started {
					fmt.Fprintf(out, "%s: its VM started\n", name)
				}
			}
			return nil
		},
	}
	f.add(c, "server URL (default: the one the desktop's record names)")
	c.Flags().DurationVar(&o.Wait, "wait", 2*time.Minute, "how long the active device has to sync up before its lease is broken")
	c.Flags().BoolVar(&o.Force, "force", false, "ignore the server's minimum interval between changes of the active role")
	c.Flags().DurationVar(&o.TTL, "ttl", 0, "lease length to ask for (0: the server's default)")
	c.Flags().BoolVar(&o.Start, "start", false, "start the desktop's VM here once this device is active (libvirt: CVD_CONNECT)")
	c.Flags().Bool("local", true, "run it here: this device becomes the active one (the default)")
	c.Flags().BoolVar(&remote, "remote", false, "run it on the data-center host of its group and print the console address")
	c.Flags().StringVar(&on, "on", "", "with --remote: the device of the group to run it on (default: its one host)")
	return c
}
