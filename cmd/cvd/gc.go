package main

import (
	"context"
	"fmt"
	"io"
	"strings"

	"github.com/spf13/cobra"

	"github.com/cvd-project/cvd/images"
)

func newGCCommand(g *globalOptions) *cobra.Command {
	var dryRun bool
	c := &cobra.Command{
		Use:   "gc",
		Short: "Remove layers that nothing keeps",
		Example: `  cvd gc --dry-run
  cvd gc`,
		Long: `Remove every layer that nothing keeps. A layer is kept when it has a name, when
a desktop version or a clone stands on it, or when a kept layer stands on it.
With --dry-run, only list what would go.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			return runGC(cmd.Context(), g, dryRun, cmd.OutOrStdout())
		},
	}
	c.Flags().BoolVarP(&dryRun, "dry-run", "n", false, "list what would be removed, remove nothing")
	return c
}

func runGC(ctx context.Context, g *globalOptions, dryRun bool, out io.Writer) error {
	st, err := openStore(g, dryRun)
	if err != nil {
		return err
	}
	defer st.Close()
	rep, err := st.GC(ctx, dryRun)
	if err != nil {
		return err
	}
	if g.json {
		if rep.Removed == nil {
			rep.Removed = []images.Layer{}
		}
		return printJSON(out, rep)
	}
	verb := "removed"
	if dryRun {
		verb = "would remove"
	}
	for _, l := range rep.Removed {
		fmt.Fprintf(out, "%s layer %s %s %s\n", verb, images.ShortID(l.ID), l.Kind, strings.TrimSpace(fmtBytes(l.FileSize)))
	}
	fmt.Fprintf(out, "%s %d layers (%s); kept %d\n", verb, len(rep.Removed), fmtBytes(rep.Bytes), rep.Kept)
	return nil
}
