package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"runtime"

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
	return readRange(ctx, img, off, n, out)
}

// readRange copies [off, off+n) of img to out in order. Reads run ahead on
// several goroutines (the image is safe for concurrent reads): worker w reads
// chunks w, w+workers, ... into its own two buffers, so memory stays at
// 2 × workers × ioChunk whatever n is, and no worker waits on another's.
func readRange(ctx context.Context, img disk.Image, off, n int64, out io.Writer) error {
	chunks := (n + ioChunk - 1) / ioChunk
	workers := int64(min(runtime.GOMAXPROCS(0), 4))
	if chunks < 4 {
		workers = 1
	}
	type result struct {
		buf []byte
		err error
	}
	// slots[w] carries worker w's chunks in order; free[w] returns its buffers.
	slots := make([]chan result, workers)
	free := make([]chan []byte, workers)
	for i := range slots {
		slots[i] = make(chan result, 1)
		free[i] = make(chan []byte, 2)
		free[i] <- make([]byte, ioChunk)
		free[i] <- make([]byte, ioChunk)
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	for w := int64(0); w < workers; w++ {
		go func() {
			for i := w; i < chunks; i += workers {
				var buf []byte
				select {
				case buf = <-free[w]:
				case <-ctx.Done():
					return
				}
				start := off + i*ioChunk
				p := buf[:min(ioChunk, off+n-start)]
				m, err := img.ReadAt(p, start)
				if err != nil && errors.Is(err, io.EOF) && m == len(p) {
					err = nil
				}
				if err != nil {
					err = fmt.Errorf("read %s at %d: %w", img.Info().Path, start, err)
				}
				select {
				case slots[w] <- result{p, err}:
				case <-ctx.Done():
					return
				}
				if err != nil {
					return
				}
			}
		}()
	}
	for i := int64(0); i < chunks; i++ {
		var r result
		select {
		case r = <-slots[i%workers]:
		case <-ctx.Done():
			return ctx.Err()
		}
		if r.err != nil {
			return r.err
		}
		if _, err := out.Write(r.buf); err != nil {
			return err
		}
		free[i%workers] <- r.buf[:cap(r.buf)]
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
