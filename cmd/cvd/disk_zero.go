package main

import (
	"context"
	"fmt"
	"io"

	"github.com/spf13/cobra"

	"github.com/cvd-project/cvd/disk"
)

type diskZeroOptions struct {
	allowRoots []string
	json       bool
}

func newDiskZeroCommand(g *globalOptions) *cobra.Command {
	opts := &diskZeroOptions{}
	c := &cobra.Command{
		Use:   "zero IMAGE OFFSET LENGTH",
		Short: "Make a range read as zeros (qcow2 v3 zero clusters where possible)",
		Long: `Make [OFFSET, OFFSET+LENGTH) of IMAGE read as zeros. Whole clusters become
zero clusters of the top layer (no data written, nothing read from the backing
chain); partial clusters at the edges are written with zeros.`,
		Example: `  cvd disk zero top.qcow2 0 1M
  cvd disk zero top.qcow2 4K 512`,
		Args: cobra.ExactArgs(3),
		RunE: func(cmd *cobra.Command, args []string) error {
			opts.allowRoots = allowRoots(cmd)
			opts.json = g.json
			return runDiskZero(cmd.Context(), opts, args, cmd.OutOrStdout())
		},
	}
	return c
}

func runDiskZero(ctx context.Context, opts *diskZeroOptions, args []string, out io.Writer) error {
	return runDiskRangeOp(opts.allowRoots, opts.json, args, out, "zero", "zeroed", disk.Image.WriteZeroes)
}

// runDiskRangeOp runs a range operation (zero, discard) on IMAGE OFFSET LENGTH,
// flushes, and reports the range.
func runDiskRangeOp(roots []string, asJSON bool, args []string, out io.Writer, verb, done string,
	op func(img disk.Image, off, n int64) error) (err error) {
	off, n, err := parseOffLen(args[1], args[2])
	if err != nil {
		return err
	}
	img, err := openImage(args[0], disk.OpenOptions{AllowedRoots: roots})
	if err != nil {
		return err
	}
	defer closeImage(img, &err)
	if err := checkRange(img, off, n); err != nil {
		return err
	}
	if err := op(img, off, n); err != nil {
		return fmt.Errorf("%s %s [%d, %d): %w", verb, args[0], off, off+n, err)
	}
	if err := img.Flush(); err != nil {
		return fmt.Errorf("flush %s: %w", args[0], err)
	}
	return reportRange(out, asJSON, done, off, n)
}
