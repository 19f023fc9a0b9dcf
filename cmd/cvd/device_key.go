package main

import (
	"fmt"

	"github.com/spf13/cobra"
)

func newDeviceKeyCommand(g *globalOptions) *cobra.Command {
	var desktop string
	c := &cobra.Command{
		Use:   "key NAME --desktop D",
		Short: "Print the escrowed key of a device's encrypted copy of a desktop (recovery)",
		Long: `Print the key of the device's encrypted copy of the desktop, from the server's
escrow (sealed in the catalog with the server's master key). It is the LUKS
passphrase of every layer and top of that copy: with it, cvd disk --key-file or
qemu-img (--object secret,data=KEY) read the copy's files, for example from a
laptop whose cvd cannot run any more. Treat the output as a secret.`,
		Example: `  cvd device key alice-laptop --desktop alice > alice.key
  cvd disk --key-file alice.key info --json /mnt/laptop/cvd/desktops/alice.system.qcow2`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if desktop == "" {
				return &exitError{code: exitUsage, err: fmt.Errorf("give --desktop")}
			}
			srv, done, err := openAdmin(g)
			if err != nil {
				return err
			}
			defer done()
			k, err := srv.EscrowedKey(args[0], desktop)
			if err != nil {
				return err
			}
			if g.json {
				return printJSON(cmd.OutOrStdout(), map[string]string{"device": args[0], "desktop": desktop, "key": k})
			}
			fmt.Fprintln(cmd.OutOrStdout(), k)
			return nil
		},
	}
	c.Flags().StringVar(&desktop, "desktop", "", "the desktop")
	return c
}
