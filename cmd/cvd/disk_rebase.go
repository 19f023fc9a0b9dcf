package main

import (
	"context"
	"fmt"
	"io"

	"github.com/spf13/cobra"

	"github.com/cvd-project/cvd/overlay"
)

type diskRebaseOptions struct {
	onto       string
	none       bool
	unsafe     bool
	allowRoots []string
	store      string
	json       bool
}

func newDiskRebaseCommand(g *globalOptions) *cobra.Command {
	opts := &diskRebaseOptions{}
	c := &cobra.Command{
		Use:   "rebase TOP --onto NEW",
		Short: "Change the backing file of a qcow2 image, keeping what the guest sees",
		Long: `Put TOP on the backing chain NEW instead of its current one.

The safe rebase (the default) keeps the guest view of TOP byte for byte: it
compares the old and new chains only where a layer that one of them holds alone
allocates clusters (layers both chains share are not read), and writes into TOP
only the clusters that TOP does not hold and whose content really differs: as
data, or as zero clusters when the old content was zeros. The cost follows the
layers that differ, not the size of the disk. A crash leaves TOP on its old
backing file with the same guest view; run the command again to finish.

--unsafe only rewrites the backing file name and format (what the guest sees
changes wherever the chains differ). --none removes the backing file (the safe
rebase then copies into TOP everything the old chain showed).

The backing file is recorded relative to TOP's directory, with its format.
A sealed TOP (read-only, or a layer of the store) is refused: it is never written.

Exit codes:
  0  rebased
  1  the rebase failed (TOP is left on its old backing file)
  2  usage error`,
		Example: `  cvd disk rebase desktop.qcow2 --onto app-v2.qcow2
  cvd disk rebase --unsafe top.qcow2 --onto moved/base.qcow2
  cvd disk rebase --json top.qcow2 --onto base.qcow2 | jq .clusters-copied`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			opts.allowRoots = allowRoots(cmd)
			opts.json = g.json
			opts.store = g.store
			return runDiskRebase(cmd.Context(), opts, args, cmd.OutOrStdout())
		},
	}
	f := c.Flags()
	f.StringVarP(&opts.onto, "onto", "b", "", "the new backing image")
	f.BoolVar(&opts.none, "none", false, "remove the backing file")
	f.BoolVarP(&opts.unsafe, "unsafe", "u", false, "only change the backing file name and format")
	return c
}

func runDiskRebase(ctx context.Context, opts *diskRebaseOptions, args []string, out io.Writer) error {
	top := args[0]
	if (opts.onto == "") == !opts.none {
		return &exitError{code: exitUsage, err: fmt.Errorf("give the new backing image with --onto NEW, or --none")}
	}
	if _, err := probe(top); err != nil {
		return err
	}
	if opts.onto != "" {
		if _, err := probe(opts.onto); err != nil {
			return err
		}
	}
	if err := refuseSealed(top); err != nil {
		return err
	}
	if root := storeRoot(top); root != "" {
		opts.allowRoots = append(opts.allowRoots, root)
	}
	rep, err := overlay.Rebase(ctx, top, opts.onto, overlay.RebaseOptions{Unsafe: opts.unsafe,
		AllowedRoots: opts.allowRoots, Sealed: storeLayer(opts.store)})
	if err != nil {
		return explainOpenError(top, err)
	}
	if opts.json {
		return writeJSON(out, rep)
	}
	onto := rep.BackingName
	if onto == "" {
		onto = "no backing file"
	}
	if rep.Unsafe {
		fmt.Fprintf(out, "rebased %s onto %s (unsafe: backing name only) in %.3fs\n", top, onto, rep.Seconds)
		return nil
	}
	fmt.Fprintf(out, "rebased %s onto %s in %.3fs\n", top, onto, rep.Seconds)
	fmt.Fprintf(out, "  shared layers skipped: %d\n", rep.SharedLayers)
	fmt.Fprintf(out, "  clusters compared:     %d (%s read)\n", rep.Compared, humanSize(rep.BytesRead))
	fmt.Fprintf(out, "  clusters copied:       %d (%s written)\n", rep.Copied, humanSize(rep.BytesWritten))
	fmt.Fprintf(out, "  zero clusters:         %d\n", rep.Zeroed)
	fmt.Fprintf(out, "  top grew by:           %s\n", humanSize(rep.Growth()))
	return nil
}
