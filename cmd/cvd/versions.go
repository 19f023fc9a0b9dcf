package main

import (
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/cvd-project/cvd/images"
)

// newDesktopSyncCommands are the desktop subcommands of sync: versions and
// rollback. desktop.go adds them to `cvd desktop`.
func newDesktopSyncCommands(g *globalOptions) []*cobra.Command {
	return []*cobra.Command{newDesktopVersionsCommand(g), newDesktopRollbackCommand(g), newDesktopDevicesCommand(g)}
}

func newDesktopVersionsCommand(g *globalOptions) *cobra.Command {
	return &cobra.Command{
		Use:   "versions DESKTOP",
		Short: "List a desktop's versions (check-ins, seals, conflicts, rollbacks) and its lease",
		Long: `List a desktop's versions as the server's store keeps them: each records the
sealed layers its disks stand on, what made it (create, check-out seal,
check-in, conflict, rollback) and, for a check-in, the device and the bytes it
moved. The head is marked with *; a conflict version is a check-in that did not
start from the head and is kept beside it.`,
		Example: `  cvd desktop versions alice
  cvd desktop versions alice --json`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := images.CheckObjectName("desktop", args[0]); err != nil {
				return storeError(err)
			}
			srv, done, err := openAdmin(g)
			if err != nil {
				return err
			}
			defer done()
			st, err := srv.Versions(args[0])
			if err != nil {
				return err
			}
			out := cmd.OutOrStdout()
			if g.json {
				return printJSON(out, st)
			}
			tw := newTable(out)
			fmt.Fprintln(tw, "\tVERSION\tCREATED\tSYSTEM\tUSER\tNOTE\tDEVICE\tBYTES")
			for _, v := range st.Versions {
				mark := ""
				if v.N == st.Head {
					mark = "*"
				}
				note := v.Note
				if v.From > 0 && !strings.HasPrefix(note, "rollback") {
					note += " from " + strconv.Itoa(v.From)
				}
				bytes := ""
				if v.Bytes > 0 {
					bytes = fmtBytes(v.Bytes)
				}
				fmt.Fprintf(tw, "%s\t%d\t%s\t%s\t%s\t%s\t%s\t%s\n", mark, v.N, v.Created.Local().Format(time.RFC3339),
					images.ShortID(v.System), images.ShortID(v.User), note, v.Device, bytes)
			}
			if err := tw.Flush(); err != nil {
				return err
			}
			if st.Lease != nil {
				state := "until"
				if st.Lease.Expired(time.Now()) {
					state = "expired at"
				}
				fmt.Fprintf(out, "lease: device %s, version %d, %s %s\n", st.Lease.DeviceName, st.Lease.Version, state,
					st.Lease.Expires.Local().Format(time.RFC3339))
			}
			return nil
		},
	}
}

func newDesktopRollbackCommand(g *globalOptions) *cobra.Command {
	var to int
	c := &cobra.Command{
		Use:   "rollback DESKTOP --to VERSION",
		Short: "Make an earlier version the head again (as a new version; nothing is discarded)",
		Long: `Make the layers of an earlier version the desktop's head, as a new version
"rollback to N". Nothing is discarded: later versions stay listed, changes on the
server's writable tops are sealed as their own version first, and a laptop that
checked out the previous head checks in as a conflict version.`,
		Example: `  cvd desktop rollback alice --to 3`,
		Args:    cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if to <= 0 {
				return &exitError{code: exitUsage, err: fmt.Errorf("give --to VERSION")}
			}
			srv, done, err := openAdmin(g)
			if err != nil {
				return err
			}
			defer done()
			v, err := srv.Rollback(cmd.Context(), args[0], to)
			if err != nil {
				return err
			}
			if g.json {
				return printJSON(cmd.OutOrStdout(), v)
			}
			fmt.Fprintf(cmd.OutOrStdout(), "%s: version %d is the head: the layers of version %d\n", args[0], v.N, to)
			return nil
		},
	}
	c.Flags().IntVar(&to, "to", 0, "version to roll back to")
	return c
}
