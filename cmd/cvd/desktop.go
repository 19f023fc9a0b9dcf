package main

import (
	"context"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/cvd-project/cvd/desktop"
	"github.com/cvd-project/cvd/images"
	"github.com/cvd-project/cvd/syncd"
)

func newDesktopCommand(g *globalOptions) *cobra.Command {
	c := &cobra.Command{
		Use:     "desktop",
		Aliases: []string{"cvd"},
		Short:   "Create, list, show and remove desktops (CVDs)",
		Long: `A desktop (CVD) is named. Its system disk is a chain: a base layer, ordered app
layers (each captured on the one before) and the desktop's own writable delta;
it may have a user disk with its own chain. A desktop has a head version and a
history of versions: each records the sealed layers its disks stand on.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error { return cmd.Help() },
	}
	c.AddCommand(newDesktopCreateCommand(g), newDesktopLsCommand(g), newDesktopShowCommand(g), newDesktopRmCommand(g), newDesktopSquashCommand(g), newDesktopPruneCommand(g), newDesktopBootCommand(g), newDesktopFilesCommand(g), newDesktopDiffCommand(g))
	c.AddCommand(newDesktopSyncCommands(g)...)
	return c
}

type desktopCreateOptions struct {
	base      string
	apps      []string
	userLayer string
	userSize  string
}

func newDesktopCreateCommand(g *globalOptions) *cobra.Command {
	opts := &desktopCreateOptions{}
	c := &cobra.Command{
		Use:   "create NAME",
		Short: "Create a desktop on a base and app layers",
		Example: `  cvd desktop create alice --base win11:2026-11 --app office:2026 --user-size 20G
  cvd desktop create kiosk --app browser:1   # the base is the app's parent`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return runDesktopCreate(cmd.Context(), g, opts, args[0], cmd.OutOrStdout())
		},
	}
	c.Flags().StringVar(&opts.base, "base", "", "base layer REF (may be left out when --app is given)")
	c.Flags().StringArrayVar(&opts.apps, "app", nil, "app layer REF, in order, each captured on the one before (repeatable)")
	c.Flags().StringVar(&opts.userLayer, "user-layer", "", "layer REF the user disk stands on")
	c.Flags().StringVar(&opts.userSize, "user-size", "", "size of a blank user disk, e.g. 20G")
	return c
}

func runDesktopCreate(ctx context.Context, g *globalOptions, opts *desktopCreateOptions, name string, out io.Writer) error {
	spec := images.DesktopSpec{Base: opts.base, Apps: opts.apps, User: opts.userLayer}
	if opts.userSize != "" {
		if opts.userLayer != "" {
			return &exitError{code: exitUsage, err: fmt.Errorf("give --user-layer or --user-size, not both")}
		}
		n, err := parseByteSize(opts.userSize)
		if err != nil {
			return err
		}
		spec.UserSize = n
	}
	st, err := openStore(g, false)
	if err != nil {
		return err
	}
	defer st.Close()
	d, err := desktop.Create(ctx, st, name, spec)
	if err != nil {
		return storeError(err)
	}
	if g.json {
		return printJSON(out, d)
	}
	return printDesktop(st, d, out)
}

func newDesktopLsCommand(g *globalOptions) *cobra.Command {
	return &cobra.Command{
		Use:     "ls",
		Aliases: []string{"list"},
		Short:   "List desktops",
		Example: `  cvd desktop ls
  cvd desktop ls --json`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			return runDesktopLs(g, cmd.OutOrStdout())
		},
	}
}

func runDesktopLs(g *globalOptions, out io.Writer) error {
	st, err := openStore(g, true)
	if err != nil {
		return err
	}
	defer st.Close()
	ds, err := st.Desktops()
	if err != nil {
		return err
	}
	if g.json {
		if ds == nil {
			ds = []images.Desktop{}
		}
		return printJSON(out, ds)
	}
	tw := newTable(out)
	fmt.Fprintln(tw, "NAME\tHEAD\tVERSIONS\tSYSTEM\tUSER\tCREATED")
	for _, d := range ds {
		sys, user := "-", "-"
		if v := d.HeadVersion(); v != nil {
			sys = images.ShortID(v.System)
			if v.User != "" {
				user = images.ShortID(v.User)
			} else if d.UserDisk != "" {
				user = "blank " + fmtBytes(d.UserSize)
			}
		}
		fmt.Fprintf(tw, "%s\t%d\t%d\t%s\t%s\t%s\n", d.Name, d.Head, len(d.Versions), sys, user, d.Created.Format("2006-01-02 15:04"))
	}
	return tw.Flush()
}

func newDesktopShowCommand(g *globalOptions) *cobra.Command {
	return &cobra.Command{
		Use:   "show NAME",
		Short: "Show a desktop: its disks, the chain of each, its versions",
		Example: `  cvd desktop show alice
  cvd desktop show alice --json   # absolute paths of its tops`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			st, err := openStore(g, true)
			if err != nil {
				return err
			}
			defer st.Close()
			d, err := st.Desktop(args[0])
			if err != nil {
				return err
			}
			if g.json {
				return printJSON(cmd.OutOrStdout(), desktopJSON(st, d))
			}
			return printDesktop(st, d, cmd.OutOrStdout())
		},
	}
}

// desktopView is a desktop as `desktop show --json` gives it: the record, and
// the absolute paths of its writable tops (a stable way for scripts and
// `cvd disk` to name the desktop's current disks).
type desktopView struct {
	*images.Desktop
	SystemPath string `json:"system_path,omitempty"`
	UserPath   string `json:"user_path,omitempty"`
}

func desktopJSON(st *images.Store, d *images.Desktop) desktopView {
	v := desktopView{Desktop: d}
	if d.SystemDisk != "" {
		v.SystemPath = st.Path(d.SystemDisk)
	}
	if d.UserDisk != "" {
		v.UserPath = st.Path(d.UserDisk)
	}
	return v
}

func printDesktop(st *images.Store, d *images.Desktop, out io.Writer) error {
	fmt.Fprintf(out, "desktop %s (head version %d, created %s)\n", d.Name, d.Head, d.Created.Format("2006-01-02 15:04:05 MST"))
	v := d.HeadVersion()
	chain := func(label, top, id string) {
		fmt.Fprintf(out, "%s disk: %s\n", label, st.Path(top))
		if id == "" {
			fmt.Fprintf(out, "  blank, %s\n", fmtBytes(d.UserSize))
			return
		}
		ls, err := st.Chain(id)
		if err != nil {
			fmt.Fprintf(out, "  chain: %v\n", err)
			return
		}
		for _, l := range ls {
			fmt.Fprintf(out, "  %s  %-7s %s\n", images.ShortID(l.ID), l.Kind, strings.Join(l.Names, ","))
		}
	}
	if v != nil && d.SystemDisk != "" {
		chain("system", d.SystemDisk, v.System)
	}
	if v != nil {
		if d.UserDisk != "" {
			chain("user", d.UserDisk, v.User)
		}
	}
	if d.Boot != nil {
		printBoot(out, d.Name, d.Boot)
	}
	fmt.Fprintln(out, "versions:")
	for _, ver := range d.Versions {
		mark := " "
		if ver.N == d.Head {
			mark = "*"
		}
		user := ""
		if ver.User != "" {
			user = " user " + images.ShortID(ver.User)
		}
		fmt.Fprintf(out, " %s %d  %s  system %s%s  %s\n", mark, ver.N, ver.Created.Format("2006-01-02 15:04"), images.ShortID(ver.System), user, ver.Note)
	}
	return nil
}

func newDesktopRmCommand(g *globalOptions) *cobra.Command {
	var withClones bool
	c := &cobra.Command{
		Use:   "rm NAME",
		Short: "Remove a desktop and its own tops (its layers stay until gc)",
		Example: `  cvd desktop rm alice
  cvd desktop rm alice --with-clones   # its clones too`,
		Long: `Remove a desktop, its writable tops and its version records. Its layers stay;
cvd gc removes those that nothing else keeps. A desktop that clones were made
from is not removed unless --with-clones, which removes those clones too. A
desktop that a device holds (checked out, its lease not expired) is not removed:
check it in, or break its lease first.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			st, err := openStore(g, false)
			if err != nil {
				return err
			}
			defer st.Close()
			if err := syncd.CheckNotHeld(st, args[0], time.Now()); err != nil {
				return fmt.Errorf("%w: check it in first, or end the lease with cvd device break-lease %s", err, args[0])
			}
			d, clones, err := st.RemoveDesktop(args[0], withClones)
			if err != nil {
				return err
			}
			if g.json {
				return printJSON(cmd.OutOrStdout(), map[string]any{"desktop": d, "clones_removed": len(clones)})
			}
			fmt.Fprintf(cmd.OutOrStdout(), "removed desktop %s and %d clones\n", d.Name, len(clones))
			return nil
		},
	}
	c.Flags().BoolVar(&withClones, "with-clones", false, "also remove the clones made from it")
	return c
}
