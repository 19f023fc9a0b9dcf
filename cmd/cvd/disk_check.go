package main

import (
	"context"
	"fmt"
	"io"

	"github.com/spf13/cobra"

	"github.com/cvd-project/cvd/disk"
)

type diskCheckOptions struct {
	repair bool
	json   bool
}

func newDiskCheckCommand(g *globalOptions) *cobra.Command {
	opts := &diskCheckOptions{}
	c := &cobra.Command{
		Use:   "check IMAGE",
		Short: "Check one qcow2 layer's refcounts against its references",
		Long: `Check IMAGE (one layer: its backing file is not read) the way qemu-img check
does: every host cluster's refcount must equal the number of references to it.
A reference to a free cluster or past the end of the file is a corruption; a
refcount higher than its references is a leak (space wasted, no data at risk).
With --repair, leaked clusters are freed; corruptions are reported, not fixed.
To check a chain, check each layer (cvd disk info --chain lists them).

Exit codes:
  0  no errors, no leaks (after --repair: nothing left)
  1  the check could not be completed
  2  corruption found
  3  leaked clusters only (repairable with --repair)`,
		Example: `  cvd disk check top.qcow2
  cvd disk check --repair top.qcow2
  cvd disk check --json top.qcow2 | jq .leaks`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			opts.json = g.json
			return runDiskCheck(cmd.Context(), opts, args, cmd.OutOrStdout())
		},
	}
	c.Flags().BoolVarP(&opts.repair, "repair", "r", false, "free leaked clusters")
	return c
}

func runDiskCheck(ctx context.Context, opts *diskCheckOptions, args []string, out io.Writer) error {
	path := args[0]
	f, err := probe(path)
	if err != nil {
		return err
	}
	if f != disk.FormatQcow2 {
		if opts.json {
			if err := writeJSON(out, &disk.CheckResult{Filename: path, Format: f}); err != nil {
				return err
			}
		} else {
			fmt.Fprintf(out, "%s is a %s image: it has no metadata to check.\n", path, f)
		}
		return nil
	}
	r, err := disk.Check(path, opts.repair)
	if err != nil {
		return &exitError{code: exitFailure, err: fmt.Errorf("check %s: %w", path, err)}
	}
	if opts.json {
		if err := writeJSON(out, r); err != nil {
			return err
		}
	} else {
		printCheckResult(out, r, opts.repair)
	}
	corrupt := r.Corruptions - r.CorruptionsFixed
	leaks := r.Leaks - r.LeaksFixed
	switch {
	case r.CheckErrors > 0:
		return &exitError{code: exitFailure, quiet: true, err: fmt.Errorf("check %s: %d check errors", path, r.CheckErrors)}
	case corrupt > 0:
		return &exitError{code: exitUsage, quiet: true, err: fmt.Errorf("check %s: %d corruptions", path, corrupt)}
	case leaks > 0:
		return &exitError{code: exitLeaks, quiet: true, err: fmt.Errorf("check %s: %d leaked clusters", path, leaks)}
	}
	return nil
}

func printCheckResult(out io.Writer, r *disk.CheckResult, repair bool) {
	for _, m := range r.Messages {
		fmt.Fprintln(out, m)
	}
	if repair && r.LeaksFixed+r.CorruptionsFixed > 0 {
		fmt.Fprintf(out, "The following inconsistencies were found and repaired:\n\n")
		fmt.Fprintf(out, "    %d leaked clusters\n    %d corruptions\n\n", r.LeaksFixed, r.CorruptionsFixed)
		fmt.Fprintln(out, "Double checking the fixed image now...")
	}
	corrupt := r.Corruptions - r.CorruptionsFixed
	leaks := r.Leaks - r.LeaksFixed
	if corrupt == 0 && leaks == 0 && r.CheckErrors == 0 {
		fmt.Fprintln(out, "No errors were found on the image.")
	}
	if corrupt > 0 {
		fmt.Fprintf(out, "\n%d errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.\n", corrupt)
	}
	if leaks > 0 {
		fmt.Fprintf(out, "\n%d leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.\n", leaks)
	}
	if r.CheckErrors > 0 {
		fmt.Fprintf(out, "\n%d internal errors have occurred during the check.\n", r.CheckErrors)
	}
	if r.TotalClusters > 0 {
		pct := func(n, of int64) float64 {
			if of == 0 {
				return 0
			}
			return 100 * float64(n) / float64(of)
		}
		fmt.Fprintf(out, "%d/%d = %.2f%% allocated, %.2f%% fragmented, %.2f%% compressed clusters\n",
			r.AllocatedClusters, r.TotalClusters, pct(r.AllocatedClusters, r.TotalClusters),
			pct(r.FragmentedClusters, r.AllocatedClusters), pct(r.CompressedClusters, r.AllocatedClusters))
	}
	fmt.Fprintf(out, "Image end offset: %d\n", r.ImageEndOffset)
}
