package overlay

import (
	"context"
	"fmt"
	"time"

	"github.com/cvd-project/cvd/disk"
)

// FlattenReport says what Flatten wrote.
type FlattenReport struct {
	Source      string      `json:"source"`
	Output      string      `json:"output"`
	Format      disk.Format `json:"format"`
	Compression string      `json:"compression,omitempty"`
	Layers      int         `json:"layers"` // layers of the source chain
	VirtualSize int64       `json:"virtual-size"`
	// DataBytes is what the chain maps as data (read and written unless it held
	// only zeros); FileSize the size of the output file.
	DataBytes int64   `json:"data-bytes"`
	FileSize  int64   `json:"file-size"`
	Seconds   float64 `json:"seconds"`
}

// Flatten writes the guest view of src (its whole chain) into a new standalone
// image at out (which must not exist): qcow2 (optionally with compressed
// clusters) or raw. Only what some layer maps as data is read; zeros stay sparse.
// On error out is removed. No layer of src is written.
func Flatten(ctx context.Context, src disk.Image, out string, opts disk.ConvertOptions) (*FlattenReport, error) {
	start := time.Now()
	format := opts.Format
	if format == "" {
		format = disk.FormatQcow2
	}
	rep := &FlattenReport{Source: src.Info().Path, Output: out, Format: format, Compression: opts.Compress,
		Layers: len(disk.Layers(src)), VirtualSize: src.Size()}
	exts, err := disk.MapChain(src, 0, src.Size())
	if err != nil {
		return nil, fmt.Errorf("flatten %s: %w", rep.Source, err)
	}
	for _, e := range exts {
		if !e.Zero {
			rep.DataBytes += e.Len
		}
	}
	if err := disk.Convert(ctx, src, out, opts); err != nil {
		return nil, fmt.Errorf("flatten %s: %w", rep.Source, err)
	}
	rep.FileSize = FileSize(out)
	rep.Seconds = time.Since(start).Seconds()
	return rep, nil
}
