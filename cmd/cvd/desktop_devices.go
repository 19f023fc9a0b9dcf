package main

import (
	"cmp"
	"fmt"
	"strconv"
	"time"

	"github.com/spf13/cobra"

	"github.com/cvd-project/cvd/syncd"
)

func newDesktopDevicesCommand(g *globalOptions) *cobra.Command {
	return &cobra.Command{
		Use:   "devices DESKTOP",
		Short: "List a desktop's device group: policy, class, role, the version each runs and has staged, when last seen",
		Long: `List the devices of a desktop's group as the server's store knows them: each
device's policy (full, apps, user), hardware class, role (at most one is
active: it holds the lease and pushes the system disk), the version it last
said it runs and the one it has staged for its next start, the bytes its last
update fetched, and when it said so.`,
		Example: `  cvd desktop devices alice
  cvd desktop devices alice --json`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			srv, done, err := openAdmin(g)
			if err != nil {
				return err
			}
			defer done()
			ms, err := srv.DesktopDevices(args[0])
			if err != nil {
				return storeError(err)
			}
			out := cmd.OutOrStdout()
			if g.json {
				if ms == nil {
					ms = []syncd.GroupMember{}
				}
				return printJSON(out, ms)
			}
			tw := newTable(out)
			fmt.Fprintln(tw, "DEVICE\tKIND\tCLASS\tPOLICY\tROLE\tRUNS\tSTAGED\tLAST UPDATE\tLAST SEEN")
			num := func(n int) string {
				if n == 0 {
					return "-"
				}
				return strconv.Itoa(n)
			}
			for _, m := range ms {
				seen := "-"
				if !m.Seen.IsZero() {
					seen = m.Seen.Local().Format(time.RFC3339)
				}
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", m.Device, m.Kind, cmp.Or(m.Class, "-"), m.Policy, m.Role,
					num(m.Runs), num(m.Staged), fmtBytes(m.Fetched), seen)
			}
			return tw.Flush()
		},
	}
}
