package main

import (
	"context"
	"io"

	"github.com/spf13/cobra"

	"github.com/cvd-project/cvd/disk"
)

type diskDiscardOptions struct {
	allowRoots []string
	json       bool
}

func newDiskDiscardCommand(g *globalOptions) *cobra.Command {
	opts := &diskDiscardOptions{}
	c := &cobra.Command{
		Use:   "discard IMAGE OFFSET LENGTH",
		Short: "Give a range back: it reads as zeros and frees the clusters it covers",
		Long: `Discard [OFFSET, OFFSET+LENGTH) of IMAGE: afterwards it reads as zeros, and
the host clusters of whole guest clusters in the range are freed. Partial
clusters at the edges are zeroed.`,
		Example: `  cvd disk discard top.qcow2 0 1G
  cvd disk discard top.qcow2 64K 64K`,
		Args: cobra.ExactArgs(3),
		RunE: func(cmd *cobra.Command, args []string) error {
			opts.allowRoots = allowRoots(cmd)
			opts.json = g.json
			return runDiskDiscard(cmd.Context(), opts, args, cmd.OutOrStdout())
		},
	}
	return c
}

func runDiskDiscard(ctx context.Context, opts *diskDiscardOptions, args []string, out io.Writer) error {
	return runDiskRangeOp(opts.allowRoots, opts.json, args, out, "discard", "discarded", disk.Image.Discard)
}
