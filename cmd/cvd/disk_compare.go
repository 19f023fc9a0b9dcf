package main

import (
	"context"
	"fmt"
	"io"

	"github.com/spf13/cobra"

	"github.com/cvd-project/cvd/disk"
)

type diskCompareOptions struct {
	allowRoots []string
	json       bool
}

func newDiskCompareCommand(g *globalOptions) *cobra.Command {
	opts := &diskCompareOptions{}
	c := &cobra.Command{
		Use:   "compare A B",
		Short: "Compare what the guest sees in two images (through their chains)",
		Long: `Compare the guest views of A and B (each read through its backing chain),
whatever their formats, cluster sizes or chain shapes. When the sizes differ the
extra part of the larger image must read as zeros, as with qemu-img compare.

Exit codes:
  0  the images read the same
  1  they differ (the first differing offset is printed)
  2  an image could not be opened or read`,
		Example: `  cvd disk compare top.qcow2 flat.qcow2
  cvd disk compare --json a.qcow2 b.raw`,
		Args: cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			opts.allowRoots = allowRoots(cmd)
			opts.json = g.json
			return runDiskCompare(cmd.Context(), opts, args, cmd.OutOrStdout())
		},
	}
	return c
}

func runDiskCompare(ctx context.Context, opts *diskCompareOptions, args []string, out io.Writer) (err error) {
	fail := func(err error) error { return &exitError{code: exitUsage, err: err} }
	a, b, err := openImagePair(args[0], args[1], opts.allowRoots)
	if err != nil {
		return fail(err)
	}
	defer closeImage(a, &err)
	defer closeImage(b, &err)

	off, err := disk.Compare(ctx, a, b)
	if err != nil {
		return fail(fmt.Errorf("compare %s %s: %w", args[0], args[1], err))
	}
	if opts.json {
		r := map[string]any{"identical": off < 0, "size-a": a.Size(), "size-b": b.Size()}
		if off >= 0 {
			r["offset"] = off
		}
		if err := writeJSON(out, r); err != nil {
			return err
		}
	} else {
		if a.Size() != b.Size() {
			fmt.Fprintln(out, "Warning: Image size mismatch!")
		}
		if off < 0 {
			fmt.Fprintln(out, "Images are identical.")
		} else {
			fmt.Fprintf(out, "Content mismatch at offset %d!\n", off)
		}
	}
	if off >= 0 {
		return &exitError{code: exitFailure, quiet: true, err: fmt.Errorf("images differ at offset %d", off)}
	}
	return nil
}
