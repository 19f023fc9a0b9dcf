package main

import (
	"context"
	"fmt"
	"io"

	"github.com/spf13/cobra"

	"github.com/cvd-project/cvd/disk"
	"github.com/cvd-project/cvd/overlay"
)

type diskFlattenOptions struct {
	output     string
	format     string
	compress   string
	allowRoots []string
	json       bool
}

func newDiskFlattenCommand(g *globalOptions) *cobra.Command {
	opts := &diskFlattenOptions{}
	c := &cobra.Command{
		Use:   "flatten CHAIN -o OUT",
		Short: "Write the guest view of a chain into one standalone image",
		Long: `Read CHAIN through its whole backing chain and write what the guest sees into
a new image OUT with no backing file: qcow2 (the default, optionally with
compressed clusters) or raw. Only what some layer maps as data is read; zeros
stay sparse. No layer of CHAIN is written.

Exit codes:
  0  flattened
  1  the flatten failed (OUT is removed)
  2  usage error`,
		Example: `  cvd disk flatten desktop.qcow2 -o standalone.qcow2
  cvd disk flatten desktop.qcow2 -o archive.qcow2 --compress zstd
  cvd disk flatten desktop.qcow2 -o disk.raw --format raw`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			opts.allowRoots = allowRoots(cmd)
			opts.json = g.json
			return runDiskFlatten(cmd.Context(), opts, args, cmd.OutOrStdout())
		},
	}
	f := c.Flags()
	f.StringVarP(&opts.output, "output", "o", "", "the new image (must not exist)")
	f.StringVarP(&opts.format, "format", "O", "qcow2", "format of OUT: qcow2 or raw")
	f.StringVarP(&opts.compress, "compress", "c", "", "compress OUT's clusters: zstd or deflate (qcow2 only)")
	return c
}

func runDiskFlatten(ctx context.Context, opts *diskFlattenOptions, args []string, out io.Writer) (err error) {
	usage := func(format string, a ...any) error { return &exitError{code: exitUsage, err: fmt.Errorf(format, a...)} }
	if opts.output == "" {
		return usage("give the output image with -o OUT")
	}
	co := disk.ConvertOptions{}
	if co.Format, err = parseFormat(opts.format); err != nil {
		return err
	}
	switch opts.compress {
	case "", "zstd", "deflate":
		co.Compress = opts.compress
	case "zlib":
		co.Compress = "deflate"
	default:
		return usage("--compress %q: use zstd or deflate", opts.compress)
	}
	if co.Compress != "" && co.Format == disk.FormatRaw {
		return usage("--compress needs the qcow2 format")
	}
	src, err := openImage(args[0], disk.OpenOptions{ReadOnly: true, AllowedRoots: opts.allowRoots})
	if err != nil {
		return err
	}
	defer closeImage(src, &err)
	rep, err := overlay.Flatten(ctx, src, opts.output, co)
	if err != nil {
		return err
	}
	if opts.json {
		return writeJSON(out, rep)
	}
	fmt.Fprintf(out, "flattened %s (%d layers, %s, %s of data) into %s (%s, %s file) in %.2fs\n",
		args[0], rep.Layers, humanSize(rep.VirtualSize), humanSize(rep.DataBytes), rep.Output, rep.Format,
		humanSize(rep.FileSize), rep.Seconds)
	return nil
}
