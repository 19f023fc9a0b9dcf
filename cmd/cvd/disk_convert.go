package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"time"

	"github.com/schollz/progressbar/v3"
	"github.com/spf13/cobra"
	"golang.org/x/term"

	"github.com/cvd-project/cvd/disk"
)

type diskConvertOptions struct {
	format      string
	compress    string
	clusterSize string
	quiet       bool
	encrypt     *disk.Encryption
	allowRoots  []string
	json        bool
	// progress receives a progress bar; nil keeps the conversion quiet.
	progress io.Writer
}

func newDiskConvertCommand(g *globalOptions) *cobra.Command {
	opts := &diskConvertOptions{}
	c := &cobra.Command{
		Use:   "convert SRC DST",
		Short: "Write the guest view of a chain into one new qcow2 or raw image (flatten)",
		Long: `Read SRC through its whole backing chain and write what the guest sees into a
new image DST with no backing file: a qcow2 v3 image (the default) or a raw
file. Ranges that read as zeros are not written (qcow2) or left as holes (raw).
With -c/--compress the qcow2 data clusters are compressed (deflate or zstd).

A progress bar is shown when stderr is a terminal, never in a pipe.`,
		Example: `  cvd disk convert top.qcow2 flat.qcow2
  cvd disk convert -O raw top.qcow2 disk.raw
  cvd disk convert -c zstd top.qcow2 archive.qcow2
  cvd disk convert --cluster-size 2M base.raw base.qcow2
  cvd disk --key-file key.txt convert --encrypt base.raw secret.qcow2`,
		Args: cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			opts.allowRoots = allowRoots(cmd)
			opts.json = g.json
			enc, _ := cmd.Flags().GetBool("encrypt")
			var err error
			if opts.encrypt, err = encryptionOf(cmd, enc); err != nil {
				return err
			}
			if !opts.quiet && !opts.json {
				if f, ok := cmd.ErrOrStderr().(*os.File); ok && term.IsTerminal(int(f.Fd())) {
					opts.progress = f
				}
			}
			return runDiskConvert(cmd.Context(), opts, args, cmd.OutOrStdout())
		},
	}
	f := c.Flags()
	f.StringVarP(&opts.format, "output-format", "O", "qcow2", "format of DST: qcow2 or raw")
	f.StringVarP(&opts.compress, "compress", "c", "", "compress DST's clusters: deflate or zstd (qcow2 only)")
	f.StringVar(&opts.clusterSize, "cluster-size", "", "cluster size of DST (default: SRC's, or 64K)")
	f.BoolVarP(&opts.quiet, "quiet", "q", false, "no progress bar")
	f.Bool("encrypt", false, "encrypt DST (LUKS, aes-256-xts, as QEMU's encrypt.format=luks) with the first --key-file")
	return c
}

func runDiskConvert(ctx context.Context, opts *diskConvertOptions, args []string, out io.Writer) (err error) {
	srcPath, dstPath := args[0], args[1]
	co := disk.ConvertOptions{Encrypt: opts.encrypt}
	if co.Format, err = parseFormat(opts.format); err != nil {
		return err
	}
	if co.Format == "" {
		co.Format = disk.FormatQcow2
	}
	switch opts.compress {
	case "", "deflate", "zstd":
		co.Compress = opts.compress
	case "zlib":
		co.Compress = "deflate"
	default:
		return &exitError{code: exitUsage, err: fmt.Errorf("--compress %q: use deflate or zstd", opts.compress)}
	}
	if co.Compress != "" && co.Format != disk.FormatQcow2 {
		return &exitError{code: exitUsage, err: fmt.Errorf("--compress needs -O qcow2")}
	}
	if opts.clusterSize != "" {
		cs, err := parseSize(opts.clusterSize)
		if err != nil {
			return &exitError{code: exitUsage, err: fmt.Errorf("--cluster-size: %w", err)}
		}
		if cs < 512 || cs > 2<<20 || cs&(cs-1) != 0 {
			return &exitError{code: exitUsage, err: fmt.Errorf("--cluster-size %s: must be a power of two from 512 to 2M", opts.clusterSize)}
		}
		if co.Format != disk.FormatQcow2 {
			return &exitError{code: exitUsage, err: fmt.Errorf("--cluster-size needs -O qcow2")}
		}
		co.ClusterSize = int(cs)
	}

	src, err := openImage(srcPath, disk.OpenOptions{ReadOnly: true, AllowedRoots: opts.allowRoots})
	if err != nil {
		return err
	}
	defer closeImage(src, &err)

	if opts.progress != nil {
		bar := progressbar.NewOptions64(src.Size(),
			progressbar.OptionSetWriter(opts.progress),
			progressbar.OptionSetDescription("converting"),
			progressbar.OptionShowBytes(true),
			progressbar.OptionUseIECUnits(true),
			progressbar.OptionSetWidth(30),
			progressbar.OptionThrottle(100*time.Millisecond),
			progressbar.OptionClearOnFinish(),
		)
		co.Progress = func(done, total int64) { _ = bar.Set64(done) }
		defer func() { _ = bar.Finish() }()
	}
	start := time.Now()
	if err := disk.Convert(ctx, src, dstPath, co); err != nil {
		return fmt.Errorf("convert %s to %s: %w", srcPath, dstPath, err)
	}
	elapsed := time.Since(start)
	var fileSize int64
	if st, err := os.Stat(dstPath); err == nil {
		fileSize = st.Size()
	}
	if opts.json {
		return writeJSON(out, map[string]any{
			"source": srcPath, "destination": dstPath, "format": co.Format,
			"compression": co.Compress, "virtual-size": src.Size(), "file-size": fileSize,
			"layers": len(disk.Layers(src)), "seconds": elapsed.Seconds(),
		})
	}
	fmt.Fprintf(out, "converted %s (%d layers, %s) to %s (%s, %s file) in %.2fs\n",
		srcPath, len(disk.Layers(src)), humanSize(src.Size()), dstPath, co.Format, humanSize(fileSize), elapsed.Seconds())
	return nil
}
