package main

import (
	"fmt"
	"io"

	"github.com/spf13/cobra"

	"github.com/cvd-project/cvd/syncd/laptop"
)

func newFollowCommand(g *globalOptions) *cobra.Command {
	f := &serverFlags{}
	var apply bool
	c := &cobra.Command{
		Use:   "follow DESKTOP --server URL --token T",
		Short: "Keep this device's copy of a desktop current without the active role: stage the head for the next start",
		Long: `Join a desktop's device group on this store as an inactive device, or bring
its copy up to date. The first run fetches the head as this device's policy
covers it (full: system and user disks; apps: the desktop's apps and versions
recomposed onto the base variant of this device's hardware class) and sets the
desktop up. Later runs fetch a newer head into the store while the desktop runs
and stage it: the running chain is not touched; the update applies at the
desktop's next start (cvd open, or --apply now while its VM is down).

An inactive device pushes its user disk only (cvd checkin --user-only); cvd open
makes it the active device. cvd agent does all of this in the background.`,
		Example: `  cvd follow alice --server https://cvd.example:8470 --token "$TOKEN" --store ~/cvd
  cvd follow alice --server http://127.0.0.1:8470 --apply --json`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := f.client()
			if err != nil {
				return err
			}
			lp, done, err := openLaptop(g, cmd.ErrOrStderr())
			if err != nil {
				return err
			}
			defer done()
			rep, err := lp.Follow(cmd.Context(), c, args[0], laptop.FollowOptions{Apply: apply})
			if err != nil {
				return storeError(err)
			}
			if g.json {
				return printJSON(cmd.OutOrStdout(), rep)
			}
			printFollow(cmd.OutOrStdout(), rep)
			return nil
		},
	}
	f.add(c, "server URL, http(s)://HOST:PORT")
	c.Flags().BoolVar(&apply, "apply", false, "apply a staged update now when the desktop's VM is down")
	return c
}

func printFollow(out io.Writer, rep *laptop.FollowReport) {
	moved := fmt.Sprintf("%d layers fetched (%s received), %d already held", len(rep.LayersFetched), fmtBytes(rep.Bytes), len(rep.LayersHeld))
	switch {
	case rep.SetUp:
		fmt.Fprintf(out, "%s: set up at version %d, policy %s: %s\n", rep.Desktop, rep.Runs, rep.Policy, moved)
	case rep.Applied:
		fmt.Fprintf(out, "%s: now at version %d: %s\n", rep.Desktop, rep.Runs, moved)
	case rep.Staged != 0:
		fmt.Fprintf(out, "%s: update staged: version %d, applies at next start (runs %d): %s\n", rep.Desktop, rep.Staged, rep.Runs, moved)
	default:
		fmt.Fprintf(out, "%s: up to date at version %d\n", rep.Desktop, rep.Runs)
	}
	if v := rep.Variant; v != nil {
		fmt.Fprintf(out, "  system disk on the base variant of class %s (layer %s): %d clusters written by both the variant and the desktop (the desktop's kept)\n",
			v.Class, v.Layer[:12], v.ConflictClusters)
	}
}
