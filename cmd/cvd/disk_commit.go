package main

import (
	"context"
	"fmt"
	"io"
	"path/filepath"
	"strings"

	"github.com/spf13/cobra"

	"github.com/cvd-project/cvd/images"
	"github.com/cvd-project/cvd/overlay"
)

type diskCommitOptions struct {
	into       string
	output     string
	store      string
	allowRoots []string
	json       bool
}

func newDiskCommitCommand(g *globalOptions) *cobra.Command {
	opts := &diskCommitOptions{}
	c := &cobra.Command{
		Use:   "commit TOP [--into LAYER]",
		Short: "Merge a top's clusters into its backing file or a lower layer",
		Long: `Merge what TOP holds, and what every layer between TOP and the target holds,
into the target: TOP's backing file, or LAYER (a lower layer of TOP's chain)
with --into. TOP is then left as an empty overlay on the target, so the guest
sees the same disk. Only clusters whose content differs from the target's are
written.

A sealed layer is never written: when the target is read-only (no write
permission) or a layer of the store (under STORE/layers), a new layer on it
receives the content instead (-o OUT, default TOP.commit.qcow2 beside TOP), and
TOP is left empty on that new layer. Seal it into the store with
cvd layer seal when you want to keep it.

A crash leaves TOP's guest view as it was. Images other than TOP that stand on
a writable target see it change, as with qemu-img commit.

Exit codes:
  0  committed
  1  the commit failed
  2  usage error`,
		Example: `  cvd disk commit top.qcow2
  cvd disk commit top.qcow2 --into base.qcow2
  cvd disk commit desktop.qcow2 -o merged.qcow2   # when the backing file is sealed`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			opts.allowRoots = allowRoots(cmd)
			opts.json = g.json
			opts.store = g.store
			return runDiskCommit(cmd.Context(), opts, args, cmd.OutOrStdout())
		},
	}
	f := c.Flags()
	f.StringVar(&opts.into, "into", "", "the lower layer to commit into (default: TOP's backing file)")
	f.StringVarP(&opts.output, "output", "o", "", "the new layer to write when the target is sealed")
	return c
}

func runDiskCommit(ctx context.Context, opts *diskCommitOptions, args []string, out io.Writer) error {
	top := args[0]
	if _, err := probe(top); err != nil {
		return err
	}
	if err := refuseSealed(top); err != nil {
		return err
	}
	if root := storeRoot(top); root != "" {
		opts.allowRoots = append(opts.allowRoots, root)
	}
	rep, err := overlay.Commit(ctx, top, overlay.CommitOptions{Into: opts.into, Output: opts.output,
		Sealed: storeLayer(opts.store), AllowedRoots: opts.allowRoots})
	if err != nil {
		return explainOpenError(top, err)
	}
	if opts.json {
		return writeJSON(out, rep)
	}
	if rep.Sealed {
		fmt.Fprintf(out, "%s is sealed: committed %s into the new layer %s on it\n", rep.Target, top, rep.NewLayer)
	} else {
		fmt.Fprintf(out, "committed %s into %s\n", top, rep.Target)
	}
	fmt.Fprintf(out, "  layers merged:     %d\n", rep.Merged)
	fmt.Fprintf(out, "  clusters compared: %d (%s read)\n", rep.Compared, humanSize(rep.BytesRead))
	fmt.Fprintf(out, "  clusters written:  %d (%s of data), %d zero clusters\n", rep.Copied, humanSize(rep.BytesWritten), rep.Zeroed)
	fmt.Fprintf(out, "  %s is now empty on %s (%.3fs)\n", top, map[bool]string{true: rep.NewLayer, false: rep.Target}[rep.Sealed], rep.Seconds)
	return nil
}

// storeLayer reports the files inside the store's layers directory: sealed
// layers that cvd never writes.
func storeLayer(store string) func(string) bool {
	layersDir := ""
	if store != "" {
		if abs, err := filepath.Abs(filepath.Join(store, "layers")); err == nil {
			layersDir = abs
			if real, err := filepath.EvalSymlinks(abs); err == nil {
				layersDir = real
			}
		}
	}
	return func(p string) bool {
		if root := storeRoot(p); root != "" && filepath.Base(filepath.Dir(p)) == images.LayersDir {
			return true // a layer of any store, --store or not
		}
		if layersDir == "" {
			return false
		}
		abs, err := filepath.Abs(p)
		if err != nil {
			return false
		}
		if real, err := filepath.EvalSymlinks(abs); err == nil {
			abs = real
		}
		return strings.HasPrefix(abs, layersDir+string(filepath.Separator))
	}
}
