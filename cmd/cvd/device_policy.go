package main

import (
	"fmt"
	"io"

	"github.com/spf13/cobra"

	"github.com/cvd-project/cvd/syncd"
)

func newDevicePolicyCommand(g *globalOptions) *cobra.Command {
	var desktops []string
	var policy, class string
	c := &cobra.Command{
		Use:   "policy NAME --desktop D --policy full|apps|user [--class C]",
		Short: "Change a device's policy in desktops' device groups, or its hardware class",
		Long: `Change which layers a device holds of a desktop it is bound to: full (the
system disk and the user disk), apps (the base variant of its hardware class
with the desktop's apps and versions recomposed onto it), or user (the user disk
alone). The device gets the head as its new policy covers it at its next
follow. --class changes the device's hardware class.`,
		Example: `  cvd device policy alice-pc --desktop alice --policy apps --class hw2
  cvd device policy alice-mac --desktop alice --policy user`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if policy == "" && class == "" {
				return &exitError{code: exitUsage, err: fmt.Errorf("give --policy (with --desktop) or --class")}
			}
			if policy != "" && len(desktops) == 0 {
				return &exitError{code: exitUsage, err: fmt.Errorf("give --desktop with --policy")}
			}
			srv, done, err := openAdmin(g)
			if err != nil {
				return err
			}
			defer done()
			d, err := srv.SetPolicy(args[0], desktops, policy, class)
			if err != nil {
				return storeError(err)
			}
			if g.json {
				return printJSON(cmd.OutOrStdout(), d)
			}
			printBindings(cmd.OutOrStdout(), d)
			return nil
		},
	}
	c.Flags().StringArrayVar(&desktops, "desktop", nil, "desktop whose binding changes (repeatable)")
	c.Flags().StringVar(&policy, "policy", "", "full, apps or user")
	c.Flags().StringVar(&class, "class", "", "the device's new hardware class")
	return c
}

func printBindings(out io.Writer, d *syncd.Device) {
	fmt.Fprintf(out, "device %s", d.Name)
	if d.Class != "" {
		fmt.Fprintf(out, " (class %s)", d.Class)
	}
	fmt.Fprintln(out, ":")
	for _, b := range d.Bindings {
		fmt.Fprintf(out, "  %s: %s\n", b.Desktop, b.Policy)
	}
}
