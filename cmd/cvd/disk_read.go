package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"runtime"

	"github.com/spf13/cobra"

	"github.com/cvd-project/cvd/disk"
	"github.com/cvd-project/cvd/internal/ordered"
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
	return readRange(ctx, img, off, n, out)
}

// readRange copies [off, off+n) of img to out in order. Reads run ahead on
// several goroutines (the image is safe for concurrent reads), in chunks of
// ioChunk bytes through 2 × workers buffers, so memory stays bounded whatever n
// is.
func readRange(ctx context.Context, img disk.Image, off, n int64, out io.Writer) error {
	chunks := (n + ioChunk - 1) / ioChunk
	workers := min(runtime.GOMAXPROCS(0), 4)
	if chunks < 4 {
		workers = 1
	}
	type chunk struct {
		off int64
		buf []byte
		err error
	}
	free := make(chan []byte, 2*workers)
	for range 2 * workers {
		free <- make([]byte, ioChunk)
	}
	return ordered.Run(ctx, workers, 2*workers,
		func(ctx context.Context, submit func(*chunk, bool) error) error {
			for i := int64(0); i < chunks; i++ {
				var buf []byte
				select {
				case buf = <-free:
				case <-ctx.Done():
					return ctx.Err()
				}
				start := off + i*ioChunk
				if err := submit(&chunk{off: start, buf: buf[:min(ioChunk, off+n-start)]}, false); err != nil {
					return err
				}
			}
			return nil
		},
		func(c *chunk) {
			m, err := img.ReadAt(c.buf, c.off)
			if err != nil && errors.Is(err, io.EOF) && m == len(c.buf) {
				err = nil
			}
			if err != nil {
				c.err = fmt.Errorf("read %s at %d: %w", img.Info().Path, c.off, err)
			}
		},
		func(c *chunk) error {
			if c.err != nil {
				return c.err
			}
			if _, err := out.Write(c.buf); err != nil {
				return err
			}
			free <- c.buf[:cap(c.buf)]
			return nil
		})
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
