package main

import (
	"context"
	"fmt"
	"io"
	"sort"
	"strings"

	"github.com/spf13/cobra"

	"github.com/cvd-project/cvd/desktop"
	"github.com/cvd-project/cvd/images"
)

type desktopSquashOptions struct {
	keep   int
	dryRun bool
	json   bool
}

func newDesktopSquashCommand(g *globalOptions) *cobra.Command {
	opts := &desktopSquashOptions{}
	c := &cobra.Command{
		Use:   "squash DESKTOP --keep N",
		Short: "Merge a desktop's old versions so that its chain stays short",
		Long: `Shorten the system chain of DESKTOP: of its own version layers, the N newest
stay and the older ones are merged into one new layer. Sealed layers are never
written: the merge is a new layer, the kept versions are re-made on it (same
content, new layers) and the writable top is copied onto the last of them.

The history is rewritten in one store transaction: versions that stood on a
merged layer are dropped, except the newest of them, which then stands on the
merge. What the desktop and every remaining version show does not change. A
crash leaves the desktop wholly as it was or wholly squashed; layers left
unused are removed by cvd gc.

Exit codes:
  0  squashed (or nothing to do, or a dry run)
  1  the squash failed
  2  usage error`,
		Example: `  cvd desktop squash alice --keep 2 --dry-run
  cvd desktop squash alice --keep 0`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			opts.json = g.json
			return runDesktopSquash(cmd.Context(), g, opts, args[0], cmd.OutOrStdout())
		},
	}
	c.Flags().IntVar(&opts.keep, "keep", 1, "newest version layers to keep as they are")
	c.Flags().BoolVarP(&opts.dryRun, "dry-run", "n", false, "report what would be merged; change nothing")
	return c
}

func runDesktopSquash(ctx context.Context, g *globalOptions, opts *desktopSquashOptions, name string, out io.Writer) error {
	if opts.keep < 0 {
		return &exitError{code: exitUsage, err: fmt.Errorf("--keep %d: must be 0 or more", opts.keep)}
	}
	st, err := openStore(g, opts.dryRun)
	if err != nil {
		return err
	}
	defer st.Close()
	rep, err := desktop.Squash(ctx, st, name, desktop.SquashOptions{Keep: opts.keep, DryRun: opts.dryRun})
	if err != nil {
		return storeError(err)
	}
	if opts.json {
		return writeJSON(out, rep)
	}
	if rep.Note != "" {
		fmt.Fprintf(out, "%s: %s\n", name, rep.Note)
		return nil
	}
	verb := "squashed"
	if !rep.Applied {
		verb = "would squash"
	}
	ids := func(xs []string) string {
		var s []string
		for _, x := range xs {
			s = append(s, images.ShortID(x))
		}
		return strings.Join(s, " ")
	}
	fmt.Fprintf(out, "%s %s: %d version layers merged into one (%s), %d kept\n", verb, name, len(rep.Merged), ids(rep.Merged), len(rep.Kept))
	if rep.Merge != "" {
		fmt.Fprintf(out, "  merge layer:   %s\n", images.ShortID(rep.Merge))
		fmt.Fprintf(out, "  kept, re-made: %s\n", ids(rep.Remade))
	}
	var ns []int
	for n := range rep.Remapped {
		ns = append(ns, n)
	}
	sort.Ints(ns)
	for _, n := range ns {
		fmt.Fprintf(out, "  version %d → %s\n", n, shortOr(rep.Remapped[n]))
	}
	if len(rep.Dropped) > 0 {
		fmt.Fprintf(out, "  versions dropped from the history: %v\n", rep.Dropped)
	}
	fmt.Fprintf(out, "  cost: %s read, %s written (%.2fs)\n", humanSize(rep.Cost.ReadBytes), humanSize(rep.Cost.WriteBytes), rep.Seconds)
	return nil
}

func shortOr(s string) string {
	if len(s) == 64 {
		return images.ShortID(s)
	}
	return s
}
