package main

import (
	"context"
	"fmt"
	"io"
	"path"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/cvd-project/cvd/clone"
	"github.com/cvd-project/cvd/images"
)

type cloneCreateOptions struct {
	name      string
	count     int
	start     int
	noSeed    bool
	fsyncEach bool
}

func newCloneCommand(g *globalOptions) *cobra.Command {
	opts := &cloneCreateOptions{}
	c := &cobra.Command{
		Use:   "clone DESKTOP|LAYER --name NAME [--count K]",
		Short: "Make linked clones of a desktop or a layer; list and remove clones",
		Long: `Make linked clones: for each, a writable qcow2 top whose backing file is the
sealed chain (the head version of a desktop, or a layer), named relative to the
store with its format recorded, plus a machine identity that is never synced: a
random UUID, a locally administered MAC (02:xx:xx:xx:xx:xx), a hostname made
from the clone's name, and a cloud-init NoCloud seed image (ISO 9660, volume
cidata, files meta-data and user-data). A desktop with a user disk gives each
clone a user top too.

With --count K the clones are named NAME-1 ... NAME-K (numbers padded to the
widest). Either all K are made or none. A SOURCE that names both a desktop and a
layer means the desktop. "cvd clone create" is the same command (use it for a
desktop called ls, show, rm or create).`,
		Example: `  cvd clone alice --name alice-vm
  cvd clone kiosk --name kiosk --count 500
  cvd clone ls
  cvd clone rm 'kiosk-*'`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return runCloneCreate(cmd, g, opts, args[0], cmd.OutOrStdout())
		},
	}
	addCloneCreateFlags(c, opts)
	create := &cobra.Command{
		Use:     "create DESKTOP|LAYER --name NAME [--count K]",
		Short:   "Make linked clones (same as cvd clone DESKTOP|LAYER)",
		Example: `  cvd clone create alice --name alice-vm --count 10`,
		Args:    cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return runCloneCreate(cmd, g, opts, args[0], cmd.OutOrStdout())
		},
	}
	addCloneCreateFlags(create, opts)
	c.AddCommand(create, newCloneLsCommand(g), newCloneShowCommand(g), newCloneRmCommand(g))
	return c
}

func addCloneCreateFlags(c *cobra.Command, opts *cloneCreateOptions) {
	c.Flags().StringVar(&opts.name, "name", "", "clone name, or the name prefix with --count")
	c.Flags().IntVar(&opts.count, "count", 1, "number of clones")
	c.Flags().IntVar(&opts.start, "start", 1, "first number with --count")
	c.Flags().BoolVar(&opts.noSeed, "no-seed", false, "do not write cloud-init seed images")
	c.Flags().BoolVar(&opts.fsyncEach, "fsync-each", false, "fsync every file instead of syncing the file system once")
}

func runCloneCreate(cmd *cobra.Command, g *globalOptions, opts *cloneCreateOptions, source string, out io.Writer) error {
	if opts.name == "" {
		return &exitError{code: exitUsage, err: fmt.Errorf("--name is required")}
	}
	if opts.count < 1 {
		return &exitError{code: exitUsage, err: fmt.Errorf("--count must be at least 1")}
	}
	st, err := openStore(g, false)
	if err != nil {
		return err
	}
	defer st.Close()
	prog, done := progressFunc(cmd, "clone")
	co := clone.Options{Name: opts.name, Count: opts.count, Start: opts.start, NoSeed: opts.noSeed, FsyncEach: opts.fsyncEach}
	if prog != nil {
		co.Progress = func(d, t int) { prog(int64(d), int64(t)) }
	}
	start := time.Now()
	cs, err := clone.Create(cmd.Context(), st, source, co)
	done()
	if err != nil {
		return storeError(err)
	}
	el := time.Since(start)
	if g.json {
		return printJSON(out, cs)
	}
	if len(cs) <= 10 {
		for _, c := range cs {
			fmt.Fprintf(out, "%s\t%s\t%s\t%s\n", c.Name, c.UUID, c.MAC, st.Path(c.Disk))
		}
	}
	fmt.Fprintf(cmd.ErrOrStderr(), "%d clones of %s in %v (%.0f clones/s)\n", len(cs), source, el.Round(time.Millisecond), float64(len(cs))/el.Seconds())
	return nil
}

func newCloneLsCommand(g *globalOptions) *cobra.Command {
	var desktop string
	c := &cobra.Command{
		Use:     "ls [PATTERN]",
		Aliases: []string{"list"},
		Short:   "List clones (optionally those whose name matches a shell pattern)",
		Example: `  cvd clone ls
  cvd clone ls "alice-vm-*" --json`,
		Args: cobra.MaximumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return runCloneLs(g, args, desktop, cmd.OutOrStdout())
		},
	}
	c.Flags().StringVar(&desktop, "desktop", "", "only clones of this desktop")
	return c
}

func runCloneLs(g *globalOptions, args []string, desktop string, out io.Writer) error {
	st, err := openStore(g, true)
	if err != nil {
		return err
	}
	defer st.Close()
	all, err := st.Clones()
	if err != nil {
		return err
	}
	cs := []images.Clone{}
	for _, c := range all {
		if desktop != "" && c.Desktop != desktop {
			continue
		}
		if len(args) == 1 {
			if ok, err := path.Match(args[0], c.Name); err != nil {
				return &exitError{code: exitUsage, err: err}
			} else if !ok {
				continue
			}
		}
		cs = append(cs, c)
	}
	if g.json {
		return printJSON(out, cs)
	}
	tw := newTable(out)
	fmt.Fprintln(tw, "NAME\tSOURCE\tLAYER\tMAC\tUUID\tHOSTNAME")
	for _, c := range cs {
		src := "layer"
		if c.Desktop != "" {
			src = fmt.Sprintf("%s@%d", c.Desktop, c.Version)
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", c.Name, src, images.ShortID(c.Layer), c.MAC, c.UUID, c.Hostname)
	}
	return tw.Flush()
}

func newCloneShowCommand(g *globalOptions) *cobra.Command {
	return &cobra.Command{
		Use:     "show NAME",
		Short:   "Show a clone: identity, files and chain",
		Example: `  cvd clone show alice-vm-01 --json`,
		Args:    cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			st, err := openStore(g, true)
			if err != nil {
				return err
			}
			defer st.Close()
			c, err := st.Clone(args[0])
			if err != nil {
				return err
			}
			out := cmd.OutOrStdout()
			if g.json {
				return printJSON(out, c)
			}
			tw := newTable(out)
			fmt.Fprintf(tw, "name\t%s\n", c.Name)
			fmt.Fprintf(tw, "uuid\t%s\n", c.UUID)
			fmt.Fprintf(tw, "mac\t%s\n", c.MAC)
			fmt.Fprintf(tw, "hostname\t%s\n", c.Hostname)
			if c.Desktop != "" {
				fmt.Fprintf(tw, "desktop\t%s (version %d)\n", c.Desktop, c.Version)
			}
			fmt.Fprintf(tw, "disk\t%s\n", st.Path(c.Disk))
			if c.UserDisk != "" {
				fmt.Fprintf(tw, "user disk\t%s\n", st.Path(c.UserDisk))
			}
			if c.Seed != "" {
				fmt.Fprintf(tw, "seed\t%s\n", st.Path(c.Seed))
			}
			tw.Flush()
			ls, err := st.Chain(c.Layer)
			if err != nil {
				return err
			}
			fmt.Fprintln(out, "chain:")
			for _, l := range ls {
				fmt.Fprintf(out, "  %s  %-7s %s\n", images.ShortID(l.ID), l.Kind, strings.Join(l.Names, ","))
			}
			return nil
		},
	}
}

func newCloneRmCommand(g *globalOptions) *cobra.Command {
	return &cobra.Command{
		Use:   "rm NAME|PATTERN...",
		Short: "Remove clones and their files (layers are never touched)",
		Example: `  cvd clone rm alice-vm-01
  cvd clone rm "kiosk-*"`,
		Long: `Remove clones: their records, tops and seed images. A shell pattern ('web-*')
removes every clone whose name matches it; a plain name must exist.`,
		Args: cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return runCloneRm(cmd.Context(), g, args, cmd.OutOrStdout())
		},
	}
}

func runCloneRm(_ context.Context, g *globalOptions, args []string, out io.Writer) error {
	st, err := openStore(g, false)
	if err != nil {
		return err
	}
	defer st.Close()
	var names []string
	var all []images.Clone
	for _, a := range args {
		if !strings.ContainsAny(a, "*?[") {
			names = append(names, a)
			continue
		}
		if all == nil {
			if all, err = st.Clones(); err != nil {
				return err
			}
		}
		for _, c := range all {
			if ok, err := path.Match(a, c.Name); err != nil {
				return &exitError{code: exitUsage, err: err}
			} else if ok {
				names = append(names, c.Name)
			}
		}
	}
	gone, err := clone.Remove(st, names...)
	if err != nil {
		return err
	}
	if g.json {
		return printJSON(out, map[string]int{"removed": len(gone)})
	}
	fmt.Fprintf(out, "removed %d clones\n", len(gone))
	return nil
}
