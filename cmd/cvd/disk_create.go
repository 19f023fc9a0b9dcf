package main

import (
	"context"
	"fmt"
	"io"

	"github.com/spf13/cobra"

	"github.com/cvd-project/cvd/disk"
)

type diskCreateOptions struct {
	backing       string
	backingFormat string
	clusterSize   string
	compression   string
	encrypt       *disk.Encryption
	allowRoots    []string
	json          bool
}

func newDiskCreateCommand(g *globalOptions) *cobra.Command {
	opts := &diskCreateOptions{}
	c := &cobra.Command{
		Use:   "create IMAGE [SIZE]",
		Short: "Create a qcow2 v3 image, empty or as an overlay on a backing image",
		Long: `Create a qcow2 v3 image of SIZE bytes. With -b the new image is an overlay:
reads of what it does not hold fall through to BACKING, and SIZE defaults to the
backing image's size.

BACKING is a path relative to the current directory (or absolute). It is stored
in the new image relative to the new image's directory where possible, always
with its format (the backing-format header extension QEMU and libvirt need).`,
		Example: `  cvd disk create base.qcow2 10G
  cvd disk create --cluster-size 2M big.qcow2 1T
  cvd disk create -b base.qcow2 top.qcow2
  cvd disk create -b base.raw -F raw top.qcow2 20G
  cvd disk create --compression zstd layer.qcow2 10G
  cvd disk --key-file key.txt create --encrypt secret.qcow2 10G`,
		Args: cobra.RangeArgs(1, 2),
		RunE: func(cmd *cobra.Command, args []string) error {
			opts.allowRoots = allowRoots(cmd)
			opts.json = g.json
			enc, _ := cmd.Flags().GetBool("encrypt")
			var err error
			if opts.encrypt, err = encryptionOf(cmd, enc); err != nil {
				return err
			}
			return runDiskCreate(cmd.Context(), opts, args, cmd.OutOrStdout())
		},
	}
	f := c.Flags()
	f.StringVarP(&opts.backing, "backing", "b", "", "backing image (overlay on it)")
	f.StringVarP(&opts.backingFormat, "backing-format", "F", "", "format of the backing image: qcow2 or raw (probed when empty)")
	f.StringVar(&opts.clusterSize, "cluster-size", "64K", "cluster size, a power of two from 512 to 2M")
	f.Bool("encrypt", false, "encrypt the image (LUKS, aes-256-xts, as QEMU's encrypt.format=luks) with the first --key-file")
	f.StringVar(&opts.compression, "compression", "", "compression type for compressed clusters: deflate (default) or zstd")
	return c
}

func runDiskCreate(ctx context.Context, opts *diskCreateOptions, args []string, out io.Writer) (err error) {
	path := args[0]
	co := disk.CreateOptions{
		BackingFile:  opts.backing,
		Compression:  opts.compression,
		AllowedRoots: opts.allowRoots,
		Encrypt:      opts.encrypt,
	}
	if len(args) == 2 {
		if co.Size, err = parseSize(args[1]); err != nil {
			return &exitError{code: exitUsage, err: err}
		}
		if co.Size == 0 {
			return &exitError{code: exitUsage, err: fmt.Errorf("size must be greater than zero")}
		}
	} else if opts.backing == "" {
		return &exitError{code: exitUsage, err: fmt.Errorf("SIZE is required without a backing image (-b)")}
	}
	cs, err := parseSize(opts.clusterSize)
	if err != nil {
		return &exitError{code: exitUsage, err: fmt.Errorf("--cluster-size: %w", err)}
	}
	if cs < 512 || cs > 2<<20 || cs&(cs-1) != 0 {
		return &exitError{code: exitUsage, err: fmt.Errorf("--cluster-size %s: must be a power of two from 512 to 2M", opts.clusterSize)}
	}
	co.ClusterSize = int(cs)
	switch opts.compression {
	case "", "deflate", "zstd":
	case "zlib":
		co.Compression = "deflate" // QEMU's name for the same thing
	default:
		return &exitError{code: exitUsage, err: fmt.Errorf("--compression %q: use deflate or zstd", opts.compression)}
	}
	if opts.backingFormat != "" && opts.backing == "" {
		return &exitError{code: exitUsage, err: fmt.Errorf("-F needs a backing image (-b)")}
	}
	if co.BackingFormat, err = parseFormat(opts.backingFormat); err != nil {
		return err
	}
	if opts.backing != "" && co.BackingFormat == "" {
		if co.BackingFormat, err = probe(opts.backing); err != nil {
			return err
		}
	}
	img, err := disk.Create(path, co)
	if err != nil {
		return explainOpenError(path, err)
	}
	info := img.Info()
	if err := img.Close(); err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	if opts.json {
		return writeJSON(out, layerJSON(info))
	}
	fmt.Fprintf(out, "Formatting '%s', fmt=qcow2 cluster_size=%d size=%d", path, info.ClusterSize, info.Size)
	if info.BackingName != "" {
		fmt.Fprintf(out, " backing_file=%s backing_fmt=%s", info.BackingName, info.BackingFormat)
	}
	if info.Compression != "" {
		fmt.Fprintf(out, " compression_type=%s", info.Compression)
	}
	fmt.Fprintln(out)
	return nil
}
