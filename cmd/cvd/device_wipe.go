package main

import (
	"fmt"

	"github.com/spf13/cobra"
)

func newDeviceWipeCommand(g *globalOptions) *cobra.Command {
	return &cobra.Command{
		Use:   "wipe NAME",
		Short: "Order a device wiped: its leases end and, at its next contact, it shreds its encrypted copies",
		Long: `Order a device wiped (a lost or stolen laptop): the leases it holds are broken at
once, and the device's next request, whatever it is (its agent's renewal, a
check-in), is answered "wiped": the device then destroys the keys of every
encrypted copy it holds from this server, their LUKS key slots, and the files.
A device that never comes back still loses its copies at the lease's expiry.
Its token is refused from then on; remove it (cvd device rm) and add it again
to use it anew.`,
		Example: `  cvd device wipe alice-laptop
  cvd device wipe alice-laptop --json`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			srv, done, err := openAdmin(g)
			if err != nil {
				return err
			}
			defer done()
			d, err := srv.WipeDevice(args[0])
			if err != nil {
				return err
			}
			if g.json {
				return printJSON(cmd.OutOrStdout(), map[string]any{"device": d.Name, "wipe": "ordered"})
			}
			fmt.Fprintf(cmd.OutOrStdout(), "device %s: wipe ordered; its encrypted copies are shredded at its next contact\n", d.Name)
			return nil
		},
	}
}
