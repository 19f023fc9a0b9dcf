package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/spf13/cobra"

	"github.com/cvd-project/cvd/images"
)

func newLayerCommand(g *globalOptions) *cobra.Command {
	c := &cobra.Command{
		Use:   "layer",
		Short: "Import, seal, list, verify and remove sealed layers",
		Long: `A layer is a sealed (read-only, never written again) qcow2 image in the store,
standing on its parent layer: base (no parent), app or version. Its ID is a
SHA-256 of its content (parent ID, virtual size, cluster size, and the digest of
every cluster it holds), so the same content has the same ID on every host
whatever the file's byte layout.

A layer reference (REF) is a full ID, an ID prefix of at least 4 hex digits, or
NAME:TAG (a bare NAME means NAME:latest, or NAME's only tag).`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error { return cmd.Help() },
	}
	c.AddCommand(newLayerImportCommand(g), newLayerSealCommand(g), newLayerLsCommand(g),
		newLayerShowCommand(g), newLayerRmCommand(g), newLayerVerifyCommand(g),
		newLayerTagCommand(g), newLayerUntagCommand(g))
	return c
}

type layerImportOptions struct {
	kind   string
	parent string
	names  []string
	force  bool
}

func newLayerImportCommand(g *globalOptions) *cobra.Command {
	opts := &layerImportOptions{}
	c := &cobra.Command{
		Use:   "import FILE",
		Short: "Copy a qcow2 or raw image into the store as a sealed layer",
		Long: `Copy the clusters FILE itself holds (not its backing chain) into the store as a
sealed layer and print its ID. A base has no parent; an app or version layer
stands on --parent, or on the store layer that FILE's backing file names.
Content the store already holds is not copied again: the same ID is printed
and the names are added.`,
		Example: `  cvd layer import win11.qcow2 --kind base --name win11:2026-11
  cvd layer import office.qcow2 --kind app --parent win11:2026-11 --name office:2026`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return runLayerImport(cmd, g, opts, args, cmd.OutOrStdout(), false)
		},
	}
	c.Flags().StringVar(&opts.kind, "kind", "", "base, app or version (default: base without a parent, app with one)")
	c.Flags().StringVar(&opts.parent, "parent", "", "parent layer REF (default: the store layer FILE's backing file names)")
	c.Flags().StringArrayVar(&opts.names, "name", nil, "NAME:TAG to give the layer (repeatable)")
	c.Flags().BoolVar(&opts.force, "force", false, "move a tag that names another layer")
	return c
}

func newLayerSealCommand(g *globalOptions) *cobra.Command {
	opts := &layerImportOptions{}
	c := &cobra.Command{
		Use:   "seal TOP|CLONE",
		Short: "Seal a writable overlay (a file, or a clone's top) as a layer on its parent",
		Long: `Turn a writable overlay into a sealed layer on its parent and print its ID. The
overlay's backing file must be a layer of the store; the overlay itself is left
as it is. TOP is a file; a name that is not a file is taken as a clone name.`,
		Example: `  cvd layer seal vm-0001 --name win11:2026-11-patched`,
		Args:    cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return runLayerImport(cmd, g, opts, args, cmd.OutOrStdout(), true)
		},
	}
	c.Flags().StringVar(&opts.kind, "kind", "version", "app or version")
	c.Flags().StringArrayVar(&opts.names, "name", nil, "NAME:TAG to give the layer (repeatable)")
	c.Flags().BoolVar(&opts.force, "force", false, "move a tag that names another layer")
	return c
}

func runLayerImport(cmd *cobra.Command, g *globalOptions, opts *layerImportOptions, args []string, out io.Writer, seal bool) error {
	iopts := images.ImportOptions{Parent: opts.parent, Names: opts.names, Force: opts.force}
	if opts.kind != "" {
		k, err := images.ParseKind(opts.kind)
		if err != nil {
			return storeError(err)
		}
		iopts.Kind = k
	}
	st, err := openStore(g, false)
	if err != nil {
		return err
	}
	defer st.Close()
	path := args[0]
	if seal {
		if _, err := os.Stat(path); err != nil {
			c, cerr := st.Clone(path)
			if cerr != nil {
				return fmt.Errorf("%s is neither a file nor a clone", path)
			}
			path = st.Path(c.Disk)
		}
	}
	prog, done := progressFunc(cmd, "import "+args[0])
	iopts.Progress = prog
	var l *images.Layer
	var existed bool
	if seal {
		l, existed, err = st.Seal(cmd.Context(), path, iopts)
	} else {
		l, existed, err = st.Import(cmd.Context(), path, iopts)
	}
	done()
	if err != nil {
		return storeError(err)
	}
	if g.json {
		return printJSON(out, struct {
			*images.Layer
			Existed bool `json:"existed"`
		}{l, existed})
	}
	fmt.Fprintln(out, l.ID)
	if existed {
		fmt.Fprintf(cmd.ErrOrStderr(), "the store already holds this content (layer %s): nothing copied\n", images.ShortID(l.ID))
	}
	return nil
}

func newLayerLsCommand(g *globalOptions) *cobra.Command {
	return &cobra.Command{
		Use:     "ls",
		Aliases: []string{"list"},
		Short:   "List layers, oldest first",
		Example: `  cvd layer ls
  cvd layer ls --json`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			return runLayerLs(g, cmd.OutOrStdout())
		},
	}
}

func runLayerLs(g *globalOptions, out io.Writer) error {
	st, err := openStore(g, true)
	if err != nil {
		return err
	}
	defer st.Close()
	ls, err := st.Layers()
	if err != nil {
		return err
	}
	if g.json {
		if ls == nil {
			ls = []images.Layer{}
		}
		return printJSON(out, ls)
	}
	tw := newTable(out)
	fmt.Fprintln(tw, "ID\tKIND\tPARENT\tSIZE\tDATA\tFILE\tNAMES")
	for _, l := range ls {
		parent := "-"
		if l.Parent != "" {
			parent = images.ShortID(l.Parent)
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\n", images.ShortID(l.ID), l.Kind, parent,
			fmtBytes(l.Size), fmtBytes(l.DataBytes), fmtBytes(l.FileSize), strings.Join(l.Names, ","))
	}
	return tw.Flush()
}

func newLayerShowCommand(g *globalOptions) *cobra.Command {
	return &cobra.Command{
		Use:   "show REF",
		Short: "Show a layer: its record, its chain down to the base, and what depends on it",
		Example: `  cvd layer show win11:2026-11
  cvd layer show 3f2a --json`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return runLayerShow(g, args[0], cmd.OutOrStdout())
		},
	}
}

type layerShowJSON struct {
	*images.Layer
	Path       string             `json:"path"`
	Chain      []string           `json:"chain"` // IDs from this layer down to the base
	Dependents []images.Dependent `json:"dependents"`
}

func runLayerShow(g *globalOptions, ref string, out io.Writer) error {
	st, err := openStore(g, true)
	if err != nil {
		return err
	}
	defer st.Close()
	l, err := st.Layer(ref)
	if err != nil {
		return err
	}
	chain, err := st.Chain(l.ID)
	if err != nil {
		return err
	}
	deps, err := st.Dependents(l.ID)
	if err != nil {
		return err
	}
	j := layerShowJSON{Layer: l, Path: st.LayerPath(l.ID), Dependents: deps}
	for _, c := range chain {
		j.Chain = append(j.Chain, c.ID)
	}
	if j.Dependents == nil {
		j.Dependents = []images.Dependent{}
	}
	if g.json {
		return printJSON(out, j)
	}
	tw := newTable(out)
	fmt.Fprintf(tw, "id\t%s\n", l.ID)
	fmt.Fprintf(tw, "kind\t%s\n", l.Kind)
	fmt.Fprintf(tw, "names\t%s\n", strings.Join(l.Names, ", "))
	fmt.Fprintf(tw, "virtual size\t%s (%d bytes)\n", fmtBytes(l.Size), l.Size)
	fmt.Fprintf(tw, "cluster size\t%d\n", l.ClusterSize)
	fmt.Fprintf(tw, "clusters\t%d (%d data, %s)\n", l.Clusters, l.DataClusters, fmtBytes(l.DataBytes))
	fmt.Fprintf(tw, "file\t%s (%s)\n", j.Path, fmtBytes(l.FileSize))
	fmt.Fprintf(tw, "created\t%s\n", l.Created.Format("2006-01-02 15:04:05 MST"))
	fmt.Fprintf(tw, "source\t%s\n", l.Source)
	tw.Flush()
	fmt.Fprintln(out, "chain:")
	for i, c := range chain {
		fmt.Fprintf(out, "  %d  %s  %-7s %s\n", i, images.ShortID(c.ID), c.Kind, strings.Join(c.Names, ","))
	}
	fmt.Fprintf(out, "dependents: %d\n", len(deps))
	for _, d := range deps {
		fmt.Fprintf(out, "  %s\n", d)
	}
	return nil
}

func newLayerRmCommand(g *globalOptions) *cobra.Command {
	return &cobra.Command{
		Use:     "rm REF...",
		Short:   "Remove layers that nothing depends on",
		Example: `  cvd layer rm office:2025-12`,
		Long: `Remove layers, their names and files. A layer that a layer, desktop or clone
stands on, directly or not, is not removed: the command fails and names them.`,
		Args: cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return runLayerRm(g, args, cmd.OutOrStdout())
		},
	}
}

func runLayerRm(g *globalOptions, refs []string, out io.Writer) error {
	st, err := openStore(g, false)
	if err != nil {
		return err
	}
	defer st.Close()
	var removed []images.Layer
	for _, r := range refs {
		l, err := st.RemoveLayer(r)
		if err != nil {
			return err
		}
		removed = append(removed, *l)
		if !g.json {
			fmt.Fprintf(out, "removed layer %s %s\n", images.ShortID(l.ID), strings.Join(l.Names, ","))
		}
	}
	if g.json {
		return printJSON(out, removed)
	}
	return nil
}

func newLayerVerifyCommand(g *globalOptions) *cobra.Command {
	return &cobra.Command{
		Use:   "verify [REF...]",
		Short: "Recompute layer IDs from their files and report layers altered behind cvd's back",
		Example: `  cvd layer verify            # every layer
  cvd layer verify win11:2026-11`,
		Long: `Read every layer (or the ones named), recompute its ID from its content, and
check its backing file name, backing format and read-only mode.

Exit codes: 0 all layers verified, 2 some layer differs from its record.`,
		Args: cobra.ArbitraryArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			return runLayerVerify(cmd.Context(), g, args, cmd.OutOrStdout())
		},
	}
}

func runLayerVerify(ctx context.Context, g *globalOptions, refs []string, out io.Writer) error {
	st, err := openStore(g, true)
	if err != nil {
		return err
	}
	defer st.Close()
	res, err := st.Verify(ctx, refs...)
	if err != nil {
		return err
	}
	bad := 0
	for _, r := range res {
		if !r.OK {
			bad++
		}
	}
	if g.json {
		if res == nil {
			res = []images.VerifyResult{}
		}
		if err := printJSON(out, res); err != nil {
			return err
		}
	} else {
		for _, r := range res {
			if r.OK {
				fmt.Fprintf(out, "ok       %s\n", images.ShortID(r.ID))
			} else {
				fmt.Fprintf(out, "ALTERED  %s: %s\n", images.ShortID(r.ID), strings.Join(r.Problems, "; "))
			}
		}
	}
	if bad > 0 {
		return &exitError{code: exitUsage, err: fmt.Errorf("%d of %d layers do not match their records", bad, len(res)), quiet: g.json}
	}
	return nil
}

func newLayerTagCommand(g *globalOptions) *cobra.Command {
	var force bool
	c := &cobra.Command{
		Use:     "tag REF NAME:TAG",
		Short:   "Give a layer a name and tag",
		Example: `  cvd layer tag 3f2a win11:stable`,
		Args:    cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			st, err := openStore(g, false)
			if err != nil {
				return err
			}
			defer st.Close()
			return storeError(st.Tag(args[0], args[1], force))
		},
	}
	c.Flags().BoolVar(&force, "force", false, "move the tag if it names another layer")
	return c
}

func newLayerUntagCommand(g *globalOptions) *cobra.Command {
	return &cobra.Command{
		Use:     "untag NAME:TAG",
		Short:   "Remove a name; the layer stays until gc finds nothing keeps it",
		Example: `  cvd layer untag win11:stable`,
		Args:    cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			st, err := openStore(g, false)
			if err != nil {
				return err
			}
			defer st.Close()
			return storeError(st.Untag(args[0]))
		},
	}
}
