package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"

	"github.com/spf13/cobra"

	"github.com/cvd-project/cvd/disk"
)

type diskWriteOptions struct {
	allowRoots []string
	json       bool
	in         io.Reader // stdin, for FILE "-" or none
}

func newDiskWriteCommand(g *globalOptions) *cobra.Command {
	opts := &diskWriteOptions{}
	c := &cobra.Command{
		Use:   "write IMAGE OFFSET [FILE|-]",
		Short: "Write the bytes of FILE (or stdin) into IMAGE at OFFSET",
		Long: `Write the contents of FILE, or of stdin when FILE is "-" or absent, into the
top layer of IMAGE at guest offset OFFSET, with copy-on-write of the untouched
part of each cluster from the backing chain. The image is flushed before the
command returns. The data must fit inside the disk: with a FILE this is checked
before anything is written.`,
		Example: `  cvd disk write top.qcow2 0 mbr.bin
  head -c 1M /dev/urandom | cvd disk write top.qcow2 64K
  cvd disk write top.qcow2 1G - < blob`,
		Args: cobra.RangeArgs(2, 3),
		RunE: func(cmd *cobra.Command, args []string) error {
			opts.allowRoots = allowRoots(cmd)
			opts.json = g.json
			opts.in = cmd.InOrStdin()
			return runDiskWrite(cmd.Context(), opts, args, cmd.OutOrStdout())
		},
	}
	return c
}

func runDiskWrite(ctx context.Context, opts *diskWriteOptions, args []string, out io.Writer) (err error) {
	off, err := parseSize(args[1])
	if err != nil {
		return &exitError{code: exitUsage, err: fmt.Errorf("OFFSET: %w", err)}
	}
	in, size := opts.in, int64(-1)
	if len(args) == 3 && args[2] != "-" {
		f, err := os.Open(args[2])
		if err != nil {
			return err
		}
		defer f.Close()
		st, err := f.Stat()
		if err != nil {
			return err
		}
		if st.Mode().IsRegular() {
			size = st.Size()
		}
		in = f
	}
	if in == nil {
		return &exitError{code: exitUsage, err: errors.New("no input: give FILE or pipe data to stdin")}
	}
	img, err := openImage(args[0], disk.OpenOptions{AllowedRoots: opts.allowRoots})
	if err != nil {
		return err
	}
	defer closeImage(img, &err)
	if size >= 0 {
		if err := checkRange(img, off, size); err != nil {
			return err
		}
	}
	// Each WriteAt pays its own metadata barriers (fsyncs): hand the engine
	// whole batches, not small pieces.
	buf := make([]byte, writeChunk)
	var done int64
	for {
		if err := ctx.Err(); err != nil {
			return err
		}
		m, rerr := io.ReadFull(in, buf)
		if m > 0 {
			if err := checkRange(img, off+done, int64(m)); err != nil {
				return fmt.Errorf("after %d bytes written: %w", done, err)
			}
			if _, err := img.WriteAt(buf[:m], off+done); err != nil {
				return fmt.Errorf("write %s at %d: %w", args[0], off+done, err)
			}
			done += int64(m)
		}
		if rerr == io.EOF || rerr == io.ErrUnexpectedEOF {
			break
		}
		if rerr != nil {
			return fmt.Errorf("read input: %w", rerr)
		}
	}
	if err := img.Flush(); err != nil {
		return fmt.Errorf("flush %s: %w", args[0], err)
	}
	return reportRange(out, opts.json, "wrote", off, done)
}

// reportRange prints what a write, zero or discard did.
func reportRange(out io.Writer, asJSON bool, verb string, off, n int64) error {
	if asJSON {
		return writeJSON(out, map[string]any{"operation": verb, "offset": off, "length": n})
	}
	_, err := fmt.Fprintf(out, "%s %d bytes at offset %d\n", verb, n, off)
	return err
}

// writeChunk is what cvd disk write gives the engine at a time: one metadata
// batch of the qcow2 engine.
const writeChunk = 32 << 20
