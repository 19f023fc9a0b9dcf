package main

import (
	"context"
	"fmt"
	"io"

	"github.com/spf13/cobra"

	"github.com/cvd-project/cvd/overlay"
)

type diskDiffOptions struct {
	allowRoots []string
	json       bool
	quiet      bool
}

func newDiskDiffCommand(g *globalOptions) *cobra.Command {
	opts := &diskDiffOptions{}
	c := &cobra.Command{
		Use:   "diff A B",
		Short: "List the cluster ranges where the guest views of two chains differ",
		Long: `List the guest ranges, in whole clusters, where A and B (each read through its
backing chain) hold different content. Past the end of the smaller disk it reads
as zeros.

The chains are compared through their shared ancestry: layers both hold (the
same file) are never read; only the clusters that a layer of one chain alone
allocates are read from both and compared byte for byte, so the list is exact
and the cost follows what the chains hold apart.

Exit codes:
  0  the guest views are the same
  1  they differ (the ranges are printed)
  2  an image could not be opened or read, or a usage error`,
		Example: `  cvd disk diff desktop-a.qcow2 desktop-b.qcow2
  cvd disk diff --json app-v1.qcow2 app-v2.qcow2 | jq .bytes`,
		Args: cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			opts.allowRoots = allowRoots(cmd)
			opts.json = g.json
			return runDiskDiff(cmd.Context(), opts, args, cmd.OutOrStdout())
		},
	}
	c.Flags().BoolVarP(&opts.quiet, "quiet", "q", false, "print only the summary line")
	return c
}

func runDiskDiff(ctx context.Context, opts *diskDiffOptions, args []string, out io.Writer) (err error) {
	fail := func(err error) error { return &exitError{code: exitUsage, err: err} }
	a, b, err := openImagePair(args[0], args[1], opts.allowRoots)
	if err != nil {
		return fail(err)
	}
	defer closeImage(a, &err)
	defer closeImage(b, &err)

	rep, err := overlay.DiffStats(ctx, a, b)
	if err != nil {
		return fail(err)
	}
	if opts.json {
		if err := writeJSON(out, rep); err != nil {
			return err
		}
	} else {
		if !opts.quiet {
			for _, r := range rep.Ranges {
				fmt.Fprintf(out, "%d\t%d\n", r.Off, r.Len)
			}
		}
		fmt.Fprintf(out, "%d clusters of %s differ (%s); %d shared layers skipped, %d clusters compared, %s read\n",
			rep.Clusters, humanSize(rep.Granularity), humanSize(rep.Bytes), rep.SharedLayers, rep.Compared, humanSize(rep.BytesRead))
	}
	if rep.Clusters > 0 {
		return &exitError{code: exitFailure, quiet: true, err: fmt.Errorf("%s and %s differ in %d clusters", args[0], args[1], rep.Clusters)}
	}
	return nil
}
