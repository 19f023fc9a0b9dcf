package main

import (
	"context"
	"fmt"
	"io"
	"text/tabwriter"

	"github.com/spf13/cobra"

	"github.com/cvd-project/cvd/disk"
)

type diskMapOptions struct {
	layer      bool
	allowRoots []string
	json       bool
}

func newDiskMapCommand(g *globalOptions) *cobra.Command {
	opts := &diskMapOptions{}
	c := &cobra.Command{
		Use:   "map IMAGE",
		Short: "Show which layer of the chain serves each range of the disk",
		Long: `Show the allocation map of IMAGE as extents. By default the map is of the
whole chain: for each range, the depth of the layer that serves it (0 is IMAGE
itself, 1 its backing file, ...) and whether it reads as zeros. With --layer
the map is of IMAGE alone: data, zero or unallocated (falls through to the
backing file).

With --json the output has the shape of qemu-img map --output=json: an array of
{start, length, depth, present, zero, data, offset} where offset is the host
offset of the data in the file at that depth, when the data is stored
uncompressed. Ranges no layer allocates have present=false and the depth of the
layer where the lookup ended, as QEMU reports it. With --layer, an unallocated
range has present=false, zero=false, data=false, and compressed data carries
"compressed": true.`,
		Example: `  cvd disk map top.qcow2
  cvd disk map --json top.qcow2 | jq '[.[] | select(.depth == 0 and .present)] | length'
  cvd disk map --layer top.qcow2`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			opts.allowRoots = allowRoots(cmd)
			opts.json = g.json
			return runDiskMap(cmd.Context(), opts, args, cmd.OutOrStdout())
		},
	}
	c.Flags().BoolVar(&opts.layer, "layer", false, "map IMAGE's own layer only, not the chain")
	return c
}

// diskMapEntry is one extent of `cvd disk map --json`, keyed as qemu-img map.
type diskMapEntry struct {
	Start   int64  `json:"start"`
	Length  int64  `json:"length"`
	Depth   int    `json:"depth"`
	Present bool   `json:"present"`
	Zero    bool   `json:"zero"`
	Data    bool   `json:"data"`
	Offset  *int64 `json:"offset,omitempty"`
	// Compressed is set with --layer only: the chain map keeps to qemu-img's keys.
	Compressed bool `json:"compressed,omitempty"`
	compressed bool
	file       string
}

func runDiskMap(ctx context.Context, opts *diskMapOptions, args []string, out io.Writer) (err error) {
	img, err := openImage(args[0], disk.OpenOptions{
		ReadOnly:     true,
		AllowedRoots: opts.allowRoots,
		NoBacking:    opts.layer,
	})
	if err != nil {
		return err
	}
	defer closeImage(img, &err)

	var entries []diskMapEntry
	if opts.layer {
		entries, err = layerMapEntries(img)
	} else {
		entries, err = chainMapEntries(img)
	}
	if err != nil {
		return fmt.Errorf("map %s: %w", args[0], err)
	}
	if opts.json {
		if entries == nil {
			entries = []diskMapEntry{}
		}
		return writeJSON(out, entries)
	}
	// For people, ranges that no layer allocates are one row whatever depth
	// QEMU would name.
	var rows []diskMapEntry
	for _, e := range entries {
		if n := len(rows); n > 0 && !e.Present && !rows[n-1].Present && rows[n-1].Start+rows[n-1].Length == e.Start {
			rows[n-1].Length += e.Length
			continue
		}
		rows = append(rows, e)
	}
	tw := tabwriter.NewWriter(out, 0, 8, 2, ' ', 0)
	fmt.Fprintln(tw, "Offset\tLength\tDepth\tState\tMapped to\tFile")
	for _, e := range rows {
		state := "unallocated"
		switch {
		case e.Data && e.compressed:
			state = "data (compressed)"
		case e.Data:
			state = "data"
		case e.Present && e.Zero:
			state = "zero"
		case e.Zero:
			state = "unallocated (zero)"
		}
		depth, mapped, file := "-", "-", "-"
		if e.Present {
			depth, file = fmt.Sprint(e.Depth), e.file
		}
		if e.Offset != nil {
			mapped = fmt.Sprintf("%#x", *e.Offset)
		}
		fmt.Fprintf(tw, "%#x\t%#x\t%s\t%s\t%s\t%s\n", e.Start, e.Length, depth, state, mapped, file)
	}
	return tw.Flush()
}

// chainMapEntries builds qemu-img map's view of the chain from MapChain, with
// host offsets from the serving layer's own map.
func chainMapEntries(img disk.Image) ([]diskMapEntry, error) {
	layers := disk.Layers(img)
	ext, err := disk.MapChain(img, 0, img.Size())
	if err != nil {
		return nil, err
	}
	var entries []diskMapEntry
	add := func(e diskMapEntry) { entries = appendMapEntry(entries, e) }
	for _, ce := range ext {
		switch {
		case ce.Depth >= 0 && ce.Depth < len(layers) && !ce.Zero:
			l := layers[ce.Depth]
			lext, err := l.MapLayer(ce.Off, ce.Len)
			if err != nil {
				return nil, fmt.Errorf("layer %d (%s): %w", ce.Depth, l.Info().Path, err)
			}
			for _, le := range clipExtents(lext, ce.Off, ce.Len) {
				e := diskMapEntry{Start: le.Off, Length: le.Len, Depth: ce.Depth, Present: true, Data: true, compressed: le.Compressed, file: l.Info().Path}
				if le.State == disk.Data && !le.Compressed && le.HostOff >= 0 {
					o := le.HostOff
					e.Offset = &o
				}
				add(e)
			}
		case ce.Depth >= 0 && ce.Depth < len(layers):
			add(diskMapEntry{Start: ce.Off, Length: ce.Len, Depth: ce.Depth, Present: true, Zero: true, file: layers[ce.Depth].Info().Path})
		default:
			// Nothing allocates it. QEMU reports the layer where the lookup
			// stopped: the bottom, or the first layer whose backing file is
			// shorter than the offset.
			for off, end := ce.Off, ce.Off+ce.Len; off < end; {
				d, next := unallocatedDepth(layers, off, end)
				add(diskMapEntry{Start: off, Length: next - off, Depth: d, Zero: true})
				off = next
			}
		}
	}
	return entries, nil
}

// unallocatedDepth is the depth QEMU reports for an unallocated offset, and the
// end of the range that shares it.
func unallocatedDepth(layers []disk.Image, off, end int64) (int, int64) {
	for i := 0; i < len(layers); i++ {
		if i+1 == len(layers) {
			return i, end
		}
		if bs := layers[i+1].Size(); off >= bs {
			return i, end
		} else if bs < end {
			// The next layer ends inside the range: the part below its end
			// goes deeper, so stop the range there.
			d, next := unallocatedDepth(layers[i+1:], off, bs)
			return i + 1 + d, next
		}
	}
	return len(layers) - 1, end
}

// clipExtents keeps the parts of ext inside [off, off+n), moving host offsets
// with the start.
func clipExtents(ext []disk.Extent, off, n int64) []disk.Extent {
	var r []disk.Extent
	end := off + n
	for _, e := range ext {
		s, t := max(e.Off, off), min(e.Off+e.Len, end)
		if s >= t {
			continue
		}
		if e.HostOff >= 0 {
			e.HostOff += s - e.Off
		}
		e.Off, e.Len = s, t-s
		r = append(r, e)
	}
	return r
}

func layerMapEntries(img disk.Image) ([]diskMapEntry, error) {
	ext, err := img.MapLayer(0, img.Size())
	if err != nil {
		return nil, err
	}
	var entries []diskMapEntry
	file := img.Info().Path
	for _, le := range ext {
		e := diskMapEntry{Start: le.Off, Length: le.Len, file: file}
		switch le.State {
		case disk.Data:
			e.Present, e.Data, e.Compressed, e.compressed = true, true, le.Compressed, le.Compressed
			if !le.Compressed && le.HostOff >= 0 {
				o := le.HostOff
				e.Offset = &o
			}
		case disk.Zero:
			e.Present, e.Zero = true, true
		}
		entries = appendMapEntry(entries, e)
	}
	return entries, nil
}

// appendMapEntry merges e into the last entry when they touch and agree on
// everything, with contiguous host offsets (qemu-img map's rule).
func appendMapEntry(entries []diskMapEntry, e diskMapEntry) []diskMapEntry {
	if e.Length <= 0 {
		return entries
	}
	if n := len(entries); n > 0 {
		p := &entries[n-1]
		if p.Start+p.Length == e.Start && p.Depth == e.Depth && p.Present == e.Present &&
			p.Zero == e.Zero && p.Data == e.Data && p.compressed == e.compressed && p.file == e.file &&
			((p.Offset == nil && e.Offset == nil) || (p.Offset != nil && e.Offset != nil && *p.Offset+p.Length == *e.Offset)) {
			p.Length += e.Length
			return entries
		}
	}
	return append(entries, e)
}
