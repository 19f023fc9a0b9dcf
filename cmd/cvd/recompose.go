package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/spf13/cobra"

	"github.com/cvd-project/cvd/desktop"
	"github.com/cvd-project/cvd/files"
	"github.com/cvd-project/cvd/images"
)

// exitConflicts: recompose left desktops on their chains because their own delta
// collides with the new layers (policy keep).
const exitConflicts = 3

type recomposeOptions struct {
	using     string
	base      string
	apps      []string
	policy    string
	dryRun    bool
	forceMeta bool
	rules     string
	workers   int
	json      bool
}

func newRecomposeCommand(g *globalOptions) *cobra.Command {
	opts := &recomposeOptions{}
	c := &cobra.Command{
		Use:   "recompose DESKTOP... | --using LAYER  --base NEW [--app NEW...]",
		Short: "Move desktops onto new base and app layers, keeping their own changes",
		Long: `Move desktops onto a new base layer and/or new app layers. Name the desktops,
or select with --using every desktop whose system chain holds LAYER. The new
layers are given as for cvd desktop create: --base, then --app in order, each
captured on the one before (--base may be left out when --app is given).

For each desktop the plan shows the conflict set: the clusters that changed
between its old and new base/app layers and that the desktop's own delta (its
own version layers and its writable top) also holds; and the cost of the move
(clusters and bytes to read and write). The old and new layers are compared
once, through their shared ancestry: only clusters the layers that differ
allocate are read.

Policies:
  keep     (default) move a desktop with its delta when nothing conflicts; leave
           a desktop with conflicts where it is and list it
  refresh  discard the system delta: an empty system top on the new layers
           (the user disk stays)
  force    keep the delta over the new layers even where they collide; refused
           for a desktop whose conflicts hold ext4 metadata (superblock, group
           descriptors, bitmaps, inode tables, journal: a desktop that ever ran
           has written them), since that corrupts its file system, unless
           --force-corrupting-metadata
  merge    move a desktop whose delta collides by files: its own file changes
           (its chain against its old base and apps, from ext4 manifests) are
           written onto an empty top over the new layers by the host kernel's
           ext4 (qemu-storage-daemon exports the new top, a loop device maps
           it; needs root), and e2fsck -fn must find every written file system
           clean. A path both the desktop and the new layers changed goes by
           the rules: the desktop's version for user paths, the layer's for
           system paths; each such file is listed. A desktop without
           collisions moves by blocks, as with keep. Hard links are written
           as separate files, extended attributes of written files are not
           carried, special files are skipped (listed).

Rules (--rules FILE), one a line, the first match wins, no match is system:
  user /home/**        a directory and everything below it
  user /root/**
  system /**
  user /etc/hostname   a path.Match pattern on the whole path

Applying builds each desktop's new chain beside the old one and switches it in
one store transaction, recorded as a new version; a crash leaves every desktop
wholly on its old chain or wholly on its new one. Sealed layers are only read.
A desktop in use (checked out) is not moved: it is marked to switch at its next
start (with the default rules for policy merge).

Exit codes:
  0  done (or a dry run)
  1  a desktop could not be recomposed (the others were)
  2  usage error
  3  some desktops were left on their chains because of conflicts (keep)`,
		Example: `  cvd recompose --using office:2026-11 --app office:2026-12 --dry-run
  cvd recompose alice bob --base win11:2026-12 --app office:2026-12
  cvd recompose --using win11:2026-11 --base win11:2026-12 --policy refresh --json
  cvd recompose alice --app office:2026-12 --policy merge --rules rules.txt --dry-run`,
		Args: func(cmd *cobra.Command, args []string) error {
			if (len(args) > 0) == (opts.using != "") {
				return &exitError{code: exitUsage, err: errors.New("name the desktops, or select them with --using LAYER (not both)")}
			}
			if opts.base == "" && len(opts.apps) == 0 {
				return &exitError{code: exitUsage, err: errors.New("give the new layers: --base NEW and/or --app NEW")}
			}
			return nil
		},
		RunE: func(cmd *cobra.Command, args []string) error {
			opts.json = g.json
			return runRecompose(cmd.Context(), g, opts, args, cmd.OutOrStdout())
		},
	}
	f := c.Flags()
	f.StringVar(&opts.using, "using", "", "recompose every desktop whose system chain holds this layer")
	f.StringVar(&opts.base, "base", "", "the new base layer")
	f.StringArrayVar(&opts.apps, "app", nil, "a new app layer, in order (repeatable)")
	f.StringVar(&opts.policy, "policy", "keep", "what to do with each desktop's own delta: keep, refresh, force or merge")
	f.StringVar(&opts.rules, "rules", "", "with --policy merge: the file of rules deciding user and system paths")
	f.BoolVarP(&opts.dryRun, "dry-run", "n", false, "plan and report; change nothing")
	f.BoolVar(&opts.forceMeta, "force-corrupting-metadata", false, "with --policy force: move desktops even where the conflicts hold file-system metadata (corrupts those file systems)")
	f.IntVar(&opts.workers, "workers", 2, "desktops planned and applied at once")
	return c
}

func runRecompose(ctx context.Context, g *globalOptions, opts *recomposeOptions, args []string, out io.Writer) error {
	policy, err := desktop.ParsePolicy(opts.policy)
	if err != nil {
		return &exitError{code: exitUsage, err: err}
	}
	var rules []files.Rule
	if opts.rules != "" {
		if policy != desktop.PolicyMerge {
			return &exitError{code: exitUsage, err: errors.New("--rules goes with --policy merge")}
		}
		f, err := os.Open(opts.rules)
		if err != nil {
			return &exitError{code: exitUsage, err: err}
		}
		rules, err = files.ParseRules(io.LimitReader(f, 16<<20))
		f.Close()
		if err != nil {
			return &exitError{code: exitUsage, err: err}
		}
	}
	st, err := openStore(g, opts.dryRun)
	if err != nil {
		return err
	}
	defer st.Close()
	rep, rerr := desktop.Recompose(ctx, st, desktop.RecomposeSpec{Desktops: args, Using: opts.using, Rules: rules,
		Base: opts.base, Apps: opts.apps, Policy: policy, DryRun: opts.dryRun, Workers: opts.workers, ForceCorruptingMetadata: opts.forceMeta})
	if rep == nil {
		return storeError(rerr)
	}
	if opts.json {
		if err := writeJSON(out, rep); err != nil {
			return err
		}
	} else {
		printRecompose(st, rep, out)
	}
	switch {
	case rerr != nil:
		return &exitError{code: exitFailure, err: rerr, quiet: opts.json}
	case rep.LeftConflicts > 0:
		return &exitError{code: exitConflicts, quiet: true, err: fmt.Errorf("%d desktops left on their chains because of conflicts", rep.LeftConflicts)}
	}
	return nil
}

// layerLabel is a short ID with the layer's names.
func layerLabel(st *images.Store, id string) string {
	if id == "" {
		return "-"
	}
	s := images.ShortID(id)
	if l, err := st.Layer(id); err == nil && len(l.Names) > 0 {
		s += " (" + strings.Join(l.Names, ", ") + ")"
	}
	return s
}

func printRecompose(st *images.Store, rep *desktop.RecomposeReport, out io.Writer) {
	mode := "applied"
	if rep.DryRun {
		mode = "dry run"
	}
	fmt.Fprintf(out, "recompose onto %s — %s, policy %s\n", layerLabel(st, rep.NewLower), mode, rep.Policy)
	fmt.Fprintf(out, "old and new layers compared: %d diff(s), %s read\n\n", rep.LowerDiffs, humanSize(rep.LowerDiffRead))
	tw := newTable(out)
	fmt.Fprintln(tw, "DESKTOP\tFROM\tCHANGED BELOW\tOWN DELTA\tCONFLICTS\tREAD / WRITE\tACTION")
	for _, p := range rep.Desktops {
		action := p.Action
		switch {
		case p.Error != "":
			action = "failed: " + p.Error
		case p.Applied:
			action += fmt.Sprintf(" → version %d", p.NewVersion)
		case p.Refused != "" && rep.Policy == desktop.PolicyMerge:
			action += ": left on its chain (merge refused)"
		case p.Refused != "":
			action += ": left on its chain (force refused: file-system metadata)"
		case p.Action == desktop.ActionConflict:
			action += ": left on its chain"
		case p.Action == desktop.ActionMark:
			action += ": in use, to switch at its next start"
		}
		conf := "0"
		if p.ConflictClusters > 0 {
			conf = fmt.Sprintf("%d (%s)", p.ConflictClusters, humanSize(p.ConflictBytes))
		}
		cost := "-"
		if p.Cost.WriteBytes > 0 || p.Cost.ReadBytes > 0 {
			cost = humanSize(p.Cost.ReadBytes) + " / " + humanSize(p.Cost.WriteBytes)
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\n", p.Desktop, layerLabel(st, p.OldLower),
			humanSize(p.LowerDiffBytes), humanSize(p.DeltaBytes), conf, cost, action)
	}
	tw.Flush()
	fmt.Fprintf(out, "\n%d to move, %d to merge by files, %d to refresh, %d left with conflicts, %d in use, %d already there, %d failed",
		rep.Moved, rep.Merged, rep.Refreshed, rep.LeftConflicts, rep.Marked, rep.Unchanged, rep.Failed)
	fmt.Fprintf(out, "; cost %s read, %s written (plan %.2fs, apply %.2fs)\n",
		humanSize(rep.Cost.ReadBytes), humanSize(rep.Cost.WriteBytes), rep.PlanSeconds, rep.ApplySeconds)
	for _, p := range rep.Desktops {
		printFileMerge(out, p)
		if p.Action != desktop.ActionConflict || len(p.Conflicts) == 0 {
			continue
		}
		fmt.Fprintf(out, "conflicts of %s: %s\n", p.Desktop, firstOf(len(p.Conflicts), func(i int) string {
			return fmt.Sprintf("%s+%s", humanSize(p.Conflicts[i].Off), humanSize(p.Conflicts[i].Len))
		}))
		if len(p.MetadataConflicts) > 0 {
			fmt.Fprintf(out, "  of which file-system metadata: %s\n", firstOf(len(p.MetadataConflicts), func(i int) string {
				r := p.MetadataConflicts[i]
				return fmt.Sprintf("%s %s+%s", r.What, humanSize(r.Off), humanSize(r.Len))
			}))
		}
		if p.MetadataUnknown != "" {
			fmt.Fprintf(out, "  file-system metadata not placed: %s\n", p.MetadataUnknown)
		}
		if len(p.ConflictFiles) > 0 {
			fmt.Fprintf(out, "  as files: %s\n", firstOf(len(p.ConflictFiles), func(i int) string {
				f := p.ConflictFiles[i]
				var sides []string
				if f.DesktopBytes > 0 {
					sides = append(sides, "desktop "+humanSize(f.DesktopBytes))
				}
				if f.LayerBytes > 0 {
					sides = append(sides, "new layers "+humanSize(f.LayerBytes))
				}
				return fmt.Sprintf("%s (%s)", f.Path, strings.Join(sides, ", "))
			}))
		}
		if p.Refused != "" {
			fmt.Fprintf(out, "  %s\n", p.Refused)
		}
	}
}

// printFileMerge lists what policy merge writes into a desktop, and every file
// whose version the rules chose.
func printFileMerge(out io.Writer, p desktop.DesktopPlan) {
	for _, fm := range p.Files {
		fmt.Fprintf(out, "files of %s, partition %d: %d written (%s), %d directories and links made, %d removed, %d already in the new layers",
			p.Desktop, fm.Partition, fm.Writes, humanSize(fm.Bytes), fm.Makes, fm.Removes, fm.SameInBoth)
		if fm.Applied != nil {
			fmt.Fprintf(out, "; e2fsck: %s", fm.Applied.Fsck)
		}
		fmt.Fprintln(out)
		for _, o := range fm.Overridden {
			loser := "the desktop's"
			if o.Winner == "desktop" {
				loser = "the layer's"
			}
			fmt.Fprintf(out, "  both changed %s (%s path, rule %q): the %s version kept, %s overridden\n", o.Path, o.Class, o.Rule, o.Winner, loser)
		}
		skipped := fm.Skipped
		if fm.Applied != nil {
			skipped = append(skipped, fm.Applied.Skipped...)
		}
		for _, sk := range skipped {
			fmt.Fprintf(out, "  not written %s: %s\n", sk.Path, sk.Why)
		}
	}
	if p.Refused != "" && p.Action == desktop.ActionConflict && len(p.Conflicts) == 0 {
		fmt.Fprintf(out, "%s: %s\n", p.Desktop, p.Refused)
	}
}

// firstOf joins the first 8 of n items (item(i) each) and says how many more
// there are.
func firstOf(n int, item func(i int) string) string {
	var out []string
	for i := 0; i < n; i++ {
		if i == 8 {
			out = append(out, fmt.Sprintf("… %d more", n-i))
			break
		}
		out = append(out, item(i))
	}
	return strings.Join(out, ", ")
}
