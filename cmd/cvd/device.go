package main

import (
	"cmp"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/cvd-project/cvd/images"
	"github.com/cvd-project/cvd/syncd"
	"github.com/cvd-project/cvd/syncd/proto"
)

// newDeviceCommand is `cvd device`: the laptops that may check desktops out of
// this store (the server's side).
func newDeviceCommand(g *globalOptions) *cobra.Command {
	c := &cobra.Command{
		Use:   "device",
		Short: "Register the devices (laptops) that check desktops out, and manage leases",
		Long: `A device is a laptop bound to desktops. ` + "`cvd device add`" + ` prints its token once:
the store keeps only its SHA-256. The laptop gives it to ` + "`cvd checkout --token`" + `.

These commands work on the server's store directly, also while ` + "`cvd serve`" + `
runs: the server sees the change at its next request.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error { return cmd.Help() },
	}
	c.AddCommand(newDeviceAddCommand(g), newDeviceLsCommand(g), newDeviceRmCommand(g), newDeviceWipeCommand(g), newDeviceKeyCommand(g), newDeviceBindCommand(g), newDevicePolicyCommand(g),
		newDeviceLeasesCommand(g), newDeviceBreakLeaseCommand(g))
	return c
}

// openAdmin opens the store and syncd's state for an administrator's command.
func openAdmin(g *globalOptions) (*syncd.Server, func(), error) {
	st, err := openStore(g, false)
	if err != nil {
		return nil, nil, err
	}
	srv, err := syncd.NewServer(st, syncd.ServerOptions{Admin: true})
	if err != nil {
		st.Close()
		return nil, nil, err
	}
	return srv, func() { srv.Close(); st.Close() }, nil
}

func newDeviceAddCommand(g *globalOptions) *cobra.Command {
	var o syncd.DeviceOptions
	var host bool
	c := &cobra.Command{
		Use:   "add NAME --desktop D [--policy full|apps|user] [--class C] | --host",
		Short: "Register a device in desktops' device groups, or a hypervisor host, and print its token (shown once)",
		Long: `Register a device (a laptop, a PC) in the device groups of desktops, or with
--host a hypervisor host of the site: it pulls the sealed layers of any desktop
(cvd pull, cvd provision --server) and takes no lease.

A device's policy says which layers it holds of each desktop: full (the system
disk and the user disk), apps (the base variant of its hardware class, with the
desktop's apps and versions recomposed onto it: see cvd variant), or user (the
user disk only). --class is its hardware class.`,
		Example: `  TOKEN=$(cvd device add alice-laptop --desktop alice)
  TOKEN=$(cvd device add alice-pc --desktop alice --policy apps --class hw2)
  HOST_TOKEN=$(cvd device add hv07 --host)`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if len(o.Desktops) == 0 && !host {
				return &exitError{code: exitUsage, err: fmt.Errorf("give at least one --desktop, or --host")}
			}
			srv, done, err := openAdmin(g)
			if err != nil {
				return err
			}
			defer done()
			add := func() (*syncd.Device, string, error) { return srv.AddDevice(args[0], o) }
			if host {
				add = func() (*syncd.Device, string, error) { return srv.AddHost(args[0], o) }
			}
			d, tok, err := add()
			if err != nil {
				return storeError(err)
			}
			out := cmd.OutOrStdout()
			if g.json {
				return printJSON(out, struct {
					Device *syncd.Device `json:"device"`
					Token  string        `json:"token"`
				}{d, tok})
			}
			fmt.Fprintln(out, tok)
			if d.Host() {
				fmt.Fprintf(cmd.ErrOrStderr(), "host %s; the token above is shown only once\n", d.Name)
			} else {
				fmt.Fprintf(cmd.ErrOrStderr(), "device %s bound to %s; the token above is shown only once\n", d.Name, strings.Join(d.Desktops, ", "))
			}
			return nil
		},
	}
	c.Flags().StringArrayVar(&o.Desktops, "desktop", nil, "desktop whose device group the device joins (repeatable)")
	c.Flags().StringVar(&o.Policy, "policy", "", "which layers the device holds: full, apps or user (default full)")
	c.Flags().StringVar(&o.Class, "class", "", "the device's hardware class (chooses the base variant under --policy apps)")
	c.Flags().BoolVar(&host, "host", false, "a hypervisor host of the site: pulls any desktop's sealed layers, takes no lease")
	return c
}

func newDeviceBindCommand(g *globalOptions) *cobra.Command {
	var desktops []string
	var policy string
	c := &cobra.Command{
		Use:   "bind NAME --desktop D [--policy full|apps|user]",
		Short: "Put a device in more desktops' device groups, or change its policy in them",
		Example: `  cvd device bind alice-laptop --desktop alice-dev
  cvd device bind alice-pc --desktop alice --policy user`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			srv, done, err := openAdmin(g)
			if err != nil {
				return err
			}
			defer done()
			if len(desktops) == 0 {
				return &exitError{code: exitUsage, err: fmt.Errorf("give at least one --desktop")}
			}
			d, err := srv.BindDevice(args[0], desktops, policy)
			if err != nil {
				return storeError(err)
			}
			if g.json {
				return printJSON(cmd.OutOrStdout(), d)
			}
			fmt.Fprintf(cmd.OutOrStdout(), "device %s: %s\n", d.Name, strings.Join(d.Desktops, ", "))
			return nil
		},
	}
	c.Flags().StringArrayVar(&desktops, "desktop", nil, "desktop to bind (repeatable)")
	c.Flags().StringVar(&policy, "policy", "", "which layers the device holds: full, apps or user (default: full for a new binding, unchanged otherwise)")
	return c
}

func newDeviceLsCommand(g *globalOptions) *cobra.Command {
	return &cobra.Command{
		Use:   "ls",
		Short: "List devices",
		Example: `  cvd device ls
  cvd device ls --json`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			srv, done, err := openAdmin(g)
			if err != nil {
				return err
			}
			defer done()
			ds, err := srv.Devices()
			if err != nil {
				return err
			}
			out := cmd.OutOrStdout()
			if g.json {
				if ds == nil {
					ds = []syncd.Device{}
				}
				return printJSON(out, ds)
			}
			tw := newTable(out)
			fmt.Fprintln(tw, "NAME\tKIND\tCLASS\tID\tDESKTOPS\tCREATED")
			for _, d := range ds {
				var desks []string
				for _, b := range d.Bindings {
					desks = append(desks, b.Desktop+"("+b.Policy+")")
				}
				if d.Host() {
					desks = append(desks, "(reads all: a host)")
				}
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", d.Name, d.Kind, cmp.Or(d.Class, "-"), d.ID, strings.Join(desks, ","), d.Created.Format(time.RFC3339))
			}
			return tw.Flush()
		},
	}
}

func newDeviceRmCommand(g *globalOptions) *cobra.Command {
	return &cobra.Command{
		Use:     "rm NAME",
		Short:   "Forget a device: its token stops working and a lease it holds is broken",
		Example: `  cvd device rm alice-laptop`,
		Args:    cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			srv, done, err := openAdmin(g)
			if err != nil {
				return err
			}
			defer done()
			d, err := srv.RemoveDevice(args[0])
			if err != nil {
				return err
			}
			if g.json {
				return printJSON(cmd.OutOrStdout(), d)
			}
			fmt.Fprintf(cmd.OutOrStdout(), "removed device %s\n", d.Name)
			return nil
		},
	}
}

func newDeviceLeasesCommand(g *globalOptions) *cobra.Command {
	return &cobra.Command{
		Use:     "leases",
		Short:   "List the desktops' leases",
		Example: `  cvd device leases --json`,
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			srv, done, err := openAdmin(g)
			if err != nil {
				return err
			}
			defer done()
			ls, err := srv.Leases()
			if err != nil {
				return err
			}
			return printLeases(cmd.OutOrStdout(), g, ls)
		},
	}
}

func printLeases(out io.Writer, g *globalOptions, ls []proto.Lease) error {
	if g.json {
		if ls == nil {
			ls = []proto.Lease{}
		}
		return printJSON(out, ls)
	}
	tw := newTable(out)
	fmt.Fprintln(tw, "DESKTOP\tDEVICE\tVERSION\tEXPIRES\tSTATE")
	now := time.Now()
	for _, l := range ls {
		state := "active"
		if l.Expired(now) {
			state = "expired"
		}
		fmt.Fprintf(tw, "%s\t%s\t%d\t%s\t%s\n", l.Desktop, l.DeviceName, l.Version, l.Expires.Local().Format(time.RFC3339), state)
	}
	return tw.Flush()
}

func newDeviceBreakLeaseCommand(g *globalOptions) *cobra.Command {
	return &cobra.Command{
		Use:     "break-lease DESKTOP",
		Short:   "End a desktop's lease whoever holds it (its next check-in becomes a conflict version)",
		Example: `  cvd device break-lease alice`,
		Args:    cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := images.CheckObjectName("desktop", args[0]); err != nil {
				return storeError(err)
			}
			srv, done, err := openAdmin(g)
			if err != nil {
				return err
			}
			defer done()
			l, err := srv.BreakLease(args[0])
			if err != nil {
				return err
			}
			if g.json {
				return printJSON(cmd.OutOrStdout(), l)
			}
			fmt.Fprintf(cmd.OutOrStdout(), "broke the lease of device %s on desktop %s\n", l.DeviceName, l.Desktop)
			return nil
		},
	}
}
