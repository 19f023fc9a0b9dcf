package main

import (
	"fmt"
	"time"

	"github.com/spf13/cobra"

	"github.com/cvd-project/cvd/desktop"
	"github.com/cvd-project/cvd/images"
)

// newVariantCommand is `cvd variant`: the base variants of hardware classes.
func newVariantCommand(g *globalOptions) *cobra.Command {
	c := &cobra.Command{
		Use:   "variant",
		Short: "Register the base variant of a hardware class (the base with its drivers)",
		Long: `A device under the apps policy keeps the base variant of its hardware class:
a layer on the desktops' common base (a driver layer, say). The server hands it
the desktop's app layers and versions recomposed onto that variant, each made
once, with the composer's conflict count (clusters both write: the desktop's
are kept).`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error { return cmd.Help() },
	}
	c.AddCommand(newVariantAddCommand(g), newVariantLsCommand(g))
	return c
}

func newVariantAddCommand(g *globalOptions) *cobra.Command {
	var base string
	c := &cobra.Command{
		Use:   "add CLASS LAYER [--base BASE]",
		Short: "Make LAYER the base variant of hardware class CLASS (it replaces BASE, by default its parent)",
		Example: `  cvd layer import drivers-hw2.qcow2 --parent debian12:1 --kind app --name drv:hw2
  cvd variant add hw2 drv:hw2`,
		Args: cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			st, err := openStore(g, false)
			if err != nil {
				return err
			}
			defer st.Close()
			v, err := desktop.RegisterVariant(st, args[0], args[1], base)
			if err != nil {
				return storeError(err)
			}
			if g.json {
				return printJSON(cmd.OutOrStdout(), v)
			}
			fmt.Fprintf(cmd.OutOrStdout(), "class %s: layer %s replaces base %s\n", v.Class, images.ShortID(v.Layer), images.ShortID(v.Base))
			return nil
		},
	}
	c.Flags().StringVar(&base, "base", "", "the common base the variant replaces (default: the layer's parent)")
	return c
}

func newVariantLsCommand(g *globalOptions) *cobra.Command {
	return &cobra.Command{
		Use:     "ls",
		Short:   "List the base variants",
		Example: `  cvd variant ls --json`,
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			st, err := openStore(g, true)
			if err != nil {
				return err
			}
			defer st.Close()
			vs, err := desktop.Variants(st)
			if err != nil {
				return err
			}
			out := cmd.OutOrStdout()
			if g.json {
				if vs == nil {
					vs = []desktop.Variant{}
				}
				return printJSON(out, vs)
			}
			tw := newTable(out)
			fmt.Fprintln(tw, "CLASS\tVARIANT\tBASE\tCREATED")
			for _, v := range vs {
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", v.Class, images.ShortID(v.Layer), images.ShortID(v.Base), v.Created.Local().Format(time.RFC3339))
			}
			return tw.Flush()
		},
	}
}
