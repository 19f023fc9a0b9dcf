package main

import (
	"context"
	"fmt"
	"io"

	"github.com/spf13/cobra"

	"github.com/cvd-project/cvd/disk"
)

type diskInfoOptions struct {
	chain      bool
	allowRoots []string
	json       bool
}

func newDiskInfoCommand(g *globalOptions) *cobra.Command {
	opts := &diskInfoOptions{}
	c := &cobra.Command{
		Use:   "info IMAGE",
		Short: "Describe an image, or every layer of its backing chain",
		Long: `Describe one image: format, qcow2 version, virtual size, file size, cluster
size, backing file name and format, compression type, refcount width, internal
snapshots and persistent bitmaps. With --chain every layer of the backing chain
is described, from the top down (the chain is opened and checked, so a backing
file outside the allowed roots is an error).

With --json the output is one object, or with --chain an array of objects (top
first), with keys named as in qemu-img info.`,
		Example: `  cvd disk info top.qcow2
  cvd disk info --chain top.qcow2
  cvd disk info --chain --json top.qcow2 | jq '.[].filename'`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			opts.allowRoots = allowRoots(cmd)
			opts.json = g.json
			return runDiskInfo(cmd.Context(), opts, args, cmd.OutOrStdout())
		},
	}
	c.Flags().BoolVar(&opts.chain, "chain", false, "describe every layer of the backing chain")
	return c
}

// diskLayerJSON is one layer in `cvd disk info --json`.
type diskLayerJSON struct {
	Filename            string `json:"filename"`
	Format              string `json:"format"`
	Version             int    `json:"version,omitempty"`
	VirtualSize         int64  `json:"virtual-size"`
	FileSize            int64  `json:"file-size"`
	ClusterSize         int    `json:"cluster-size"`
	BackingFilename     string `json:"backing-filename,omitempty"`
	BackingFormat       string `json:"backing-filename-format,omitempty"`
	FullBackingFilename string `json:"full-backing-filename,omitempty"`
	CompressionType     string `json:"compression-type,omitempty"`
	RefcountBits        int    `json:"refcount-bits,omitempty"`
	Snapshots           int    `json:"snapshots"`
	Bitmaps             bool   `json:"bitmaps"`
	ReadOnly            bool   `json:"read-only"`
	Depth               *int   `json:"depth,omitempty"`
	Encrypted           bool   `json:"encrypted"`
}

func layerJSON(i disk.Info) diskLayerJSON {
	return diskLayerJSON{
		Filename:        i.Path,
		Format:          string(i.Format),
		Version:         i.Version,
		VirtualSize:     i.Size,
		FileSize:        i.FileSize,
		ClusterSize:     i.ClusterSize,
		BackingFilename: i.BackingName,
		BackingFormat:   string(i.BackingFormat),
		CompressionType: i.Compression,
		RefcountBits:    i.RefcountBits,
		Snapshots:       i.Snapshots,
		Bitmaps:         i.Bitmaps,
		ReadOnly:        i.ReadOnly,
		Encrypted:       i.Encrypted,
	}
}

func runDiskInfo(ctx context.Context, opts *diskInfoOptions, args []string, out io.Writer) (err error) {
	img, err := openImage(args[0], disk.OpenOptions{
		ReadOnly:     true,
		AllowedRoots: opts.allowRoots,
		NoBacking:    !opts.chain,
	})
	if err != nil {
		return err
	}
	defer closeImage(img, &err)

	layers := []disk.Image{img}
	if opts.chain {
		layers = disk.Layers(img)
	}
	var js []diskLayerJSON
	for i, l := range layers {
		j := layerJSON(l.Info())
		if opts.chain {
			d := i
			j.Depth = &d
			if i+1 < len(layers) {
				j.FullBackingFilename = layers[i+1].Info().Path
			}
		}
		js = append(js, j)
	}
	if opts.json {
		if opts.chain {
			return writeJSON(out, js)
		}
		return writeJSON(out, js[0])
	}
	for i, j := range js {
		if i > 0 {
			fmt.Fprintln(out)
		}
		printLayerInfo(out, j)
	}
	return nil
}

func printLayerInfo(out io.Writer, j diskLayerJSON) {
	if j.Depth != nil {
		fmt.Fprintf(out, "layer %d\n", *j.Depth)
	}
	fmt.Fprintf(out, "image: %s\n", j.Filename)
	fmt.Fprintf(out, "file format: %s\n", j.Format)
	fmt.Fprintf(out, "virtual size: %s (%d bytes)\n", humanSize(j.VirtualSize), j.VirtualSize)
	fmt.Fprintf(out, "file size: %s (%d bytes)\n", humanSize(j.FileSize), j.FileSize)
	if j.Format != string(disk.FormatQcow2) {
		return
	}
	fmt.Fprintf(out, "qcow2 version: %d\n", j.Version)
	fmt.Fprintf(out, "cluster size: %d\n", j.ClusterSize)
	if j.BackingFilename != "" {
		fmt.Fprintf(out, "backing file: %s", j.BackingFilename)
		if j.FullBackingFilename != "" {
			fmt.Fprintf(out, " (actual path: %s)", j.FullBackingFilename)
		}
		fmt.Fprintln(out)
		bf := j.BackingFormat
		if bf == "" {
			bf = "(not recorded)"
		}
		fmt.Fprintf(out, "backing file format: %s\n", bf)
	}
	if j.CompressionType != "" {
		fmt.Fprintf(out, "compression type: %s\n", j.CompressionType)
	}
	if j.RefcountBits != 0 {
		fmt.Fprintf(out, "refcount bits: %d\n", j.RefcountBits)
	}
	bm := "no"
	if j.Bitmaps {
		bm = "yes"
	}
	fmt.Fprintf(out, "snapshots: %d\n", j.Snapshots)
	fmt.Fprintf(out, "bitmaps: %s\n", bm)
}
