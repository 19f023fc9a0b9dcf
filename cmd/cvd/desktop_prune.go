package main

import (
	"fmt"
	"time"

	"github.com/spf13/cobra"

	"github.com/cvd-project/cvd/desktop"
	"github.com/cvd-project/cvd/images"
	"github.com/cvd-project/cvd/syncd"
)

func newDesktopPruneCommand(g *globalOptions) *cobra.Command {
	var keep int
	var dryRun bool
	c := &cobra.Command{
		Use:   "prune DESKTOP --keep N",
		Short: "Remove a desktop's old versions, so that gc can free the layers only they used",
		Long: `Remove the records of a desktop's old versions. The head, the N newest versions,
and the versions that sync still stands on (the version a device's lease was
granted on, the base of a check-in being received) are kept. The layers stay
until ` + "`cvd gc`" + `, which frees those that nothing keeps any more: the old app and
base layers a recomposed desktop no longer uses, the versions in between.`,
		Example: `  cvd desktop prune alice --keep 5 --dry-run
  cvd desktop prune alice --keep 5 && cvd gc`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			st, err := openStore(g, dryRun)
			if err != nil {
				return err
			}
			defer st.Close()
			pinned, err := syncd.PinnedVersions(st, args[0], time.Now())
			if err != nil {
				return err
			}
			gone, err := desktop.Prune(st, args[0], keep, dryRun, pinned...)
			if err != nil {
				return storeError(err)
			}
			if g.json {
				if gone == nil {
					gone = []images.Version{}
				}
				return printJSON(cmd.OutOrStdout(), map[string]any{"desktop": args[0], "dry_run": dryRun, "removed": gone})
			}
			verb := "removed"
			if dryRun {
				verb = "would remove"
			}
			fmt.Fprintf(cmd.OutOrStdout(), "%s %d versions of %s", verb, len(gone), args[0])
			for i, v := range gone {
				sep := ", "
				if i == 0 {
					sep = ": "
				}
				fmt.Fprintf(cmd.OutOrStdout(), "%s%d", sep, v.N)
			}
			fmt.Fprintln(cmd.OutOrStdout())
			return nil
		},
	}
	c.Flags().IntVar(&keep, "keep", 0, "newest versions to keep besides the head (required)")
	c.Flags().BoolVarP(&dryRun, "dry-run", "n", false, "say which versions would go; change nothing")
	c.MarkFlagRequired("keep")
	return c
}
