package main

import (
	"context"
	"errors"
	"fmt"
	"io"

	"github.com/cvd-project/cvd/disk"
	"github.com/spf13/cobra"
)

// ioChunk bounds the memory read, write and friends use, whatever the length.
const ioChunk = 1 << 20

type diskReadOptions struct {
	allowRoots []string
}

func newDiskReadCommand(g *globalOptions) *cobra.Command {
	opts := &diskReadOptions{}
	c := &cobra.Command{
		Use:   "read IMAGE OFFSET LENGTH",
		Short: "Write LENGTH bytes of the guest view at OFFSET to stdout",
		Long: `Read LENGTH bytes at guest offset OFFSET through IMAGE's whole backing chain
and write them to stdout, unchanged. The range must lie inside the disk.`,
		Example: `  cvd disk read top.qcow2 0 512 | xxd | head
  cvd disk read top.qcow2 1M 64K > cluster.bin
  cvd disk read top.qcow2 0 10G | sha256sum`,
		Args: cobra.ExactArgs(3),
		RunE: func(cmd *cobra.Command, args []string) error {
			opts.allowRoots = allowRoots(cmd)
			return runDiskRead(cmd.Context(), opts, args, cmd.OutOrStdout())
		},
	}
	return c
}

func runDiskRead(ctx context.Context, opts *diskReadOptions, args []string, out io.Writer) (err error) {
	off, n, err := parseOffLen(args[1], args[2])
	if err != nil {
		return err
	}
	img, err := openImage(args[0], disk.OpenOptions{ReadOnly: true, AllowedRoots: opts.allowRoots})
	if err != nil {
		return err
	}
	defer closeImage(img, &err)
	if err := checkRange(img, off, n); err != nil {
		return err
	}
	buf := make([]byte, min(n, ioChunk))
	for done := int64(0); done < n; {
		if err := ctx.Err(); err != nil {
			return err
		}
		p := buf[:min(int64(len(buf)), n-done)]
		m, err := img.ReadAt(p, off+done)
		if err != nil && !(errors.Is(err, io.EOF) && m == len(p)) {
			return fmt.Errorf("read %s at %d: %w", args[0], off+done, err)
		}
		if _, err := out.Write(p); err != nil {
			return err
		}
		done += int64(len(p))
	}
	return nil
}

// parseOffLen reads an OFFSET and LENGTH argument pair.
func parseOffLen(o, l string) (off, n int64, err error) {
	if off, err = parseSize(o); err != nil {
		return 0, 0, &exitError{code: exitUsage, err: fmt.Errorf("OFFSET: %w", err)}
	}
	if n, err = parseSize(l); err != nil {
		return 0, 0, &exitError{code: exitUsage, err: fmt.Errorf("LENGTH: %w", err)}
	}
	return off, n, nil
}
