package main

import (
	"context"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/cvd-project/cvd/syncd/laptop"

	"github.com/spf13/cobra"

	"github.com/cvd-project/cvd/images"
	"github.com/cvd-project/cvd/syncd/proto"
)

type checkinOptions struct {
	release  bool
	userOnly bool
	server   string
	caCert   string
	bwlimit  string
}

func newCheckinCommand(g *globalOptions) *cobra.Command {
	opts := &checkinOptions{}
	c := &cobra.Command{
		Use:   "checkin DESKTOP",
		Short: "Check a desktop's changes in to its server as a new version",
		Long: `Check a desktop in: the writable tops made at check-out hold exactly the
clusters changed since (no scan of the disk). Their digests go to the server,
which answers which clusters it lacks among every layer it holds; only those are
sent. The server writes the new version, syncs and seals it, and moves the head
in one step; until then its head is unchanged. The laptop then freezes its tops
as the same version and starts fresh ones, so the next check-in is incremental.

An interrupted check-in resumes when run again and sends only what is missing.
A check-in that does not start from the server's head (a broken lease, a
rollback) is kept as a conflict version beside the head. When its user disk
changed on another layer than the head's (another device checked in since) and
the user disks hold ext4, the server then merges the user files by the table:
added or changed elsewhere → taken, deleted elsewhere and unchanged here →
deleted, changed differently → both kept (the other's as "NAME (conflicted copy
DEVICE DATE)"), changed here and deleted elsewhere → kept; the merged version is
the new head and the report lists each path.

On a device that is not the desktop's active one (cvd follow), the server takes
the user disk's changes only: --user-only sends them and keeps the system disk's
here (a push of the system disk is refused, naming the active device).

Shut the desktop's VM down first: its tops must not change during the check-in.`,
		Example: `  cvd checkin alice
  cvd checkin alice --release --json
  cvd checkin alice --bwlimit 20M
  cvd checkin alice --user-only`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return runCheckin(cmd.Context(), g, opts, args[0], cmd.OutOrStdout(), cmd.ErrOrStderr())
		},
	}
	c.Flags().BoolVar(&opts.release, "release", false, "give the lease back afterwards and remove the local copy")
	c.Flags().BoolVar(&opts.userOnly, "user-only", false, "send the user disk's changes only (an inactive device of the desktop's group)")
	c.Flags().StringVar(&opts.server, "server", "", "the server's URL, when it moved since the check-out (remembered)")
	c.Flags().StringVar(&opts.caCert, "ca-cert", "", "PEM file of a CA to trust for an https server (remembered)")
	c.Flags().StringVar(&opts.bwlimit, "bwlimit", "", "cap the bytes per second moved, e.g. 20M (default: no cap)")
	return c
}

func runCheckin(ctx context.Context, g *globalOptions, opts *checkinOptions, desktop string, out, errOut io.Writer) error {
	limit, err := parseRate(opts.bwlimit)
	if err != nil {
		return err
	}
	lp, done, err := openLaptop(g, errOut)
	if err != nil {
		return err
	}
	defer done()
	rep, err := lp.CheckIn(ctx, desktop, laptop.CheckinOptions{Release: opts.release, Server: opts.server, CACert: opts.caCert, RateLimit: limit,
		UserOnly: opts.userOnly})
	if err != nil {
		return storeError(err)
	}
	if g.json {
		return printJSON(out, rep)
	}
	printCheckinReport(out, rep)
	return nil
}

func printCheckinReport(out io.Writer, rep *laptop.CheckinReport) {
	if rep.NoChanges {
		fmt.Fprintf(out, "%s: no changes since version %d\n", rep.Desktop, rep.Version)
		if rep.Released {
			fmt.Fprintf(out, "  lease released; the local copy is removed\n")
		}
		return
	}
	what := "head"
	if rep.Conflict {
		what = fmt.Sprintf("CONFLICT version beside head %d", rep.Head)
	}
	fmt.Fprintf(out, "checked in %s as version %d (%s), from version %d\n", rep.Desktop, rep.Version, what, rep.Base)
	fmt.Fprintf(out, "  changed %d clusters (%s of data); sent %d clusters, %s payload (%d bytes) + %d bytes metadata; %d deduplicated by the server\n",
		rep.Changed, fmtBytes(rep.ChangedBytes), rep.Sent, fmtBytes(rep.Payload), rep.Payload, rep.Metadata, rep.Deduplicated)
	fmt.Fprintf(out, "  took %.2fs (transfer and commit %.2fs)\n", rep.Took, rep.TookUpload)
	for _, dn := range []string{proto.DiskSystem, proto.DiskUser} {
		if id := rep.Layers[dn]; id != "" {
			fmt.Fprintf(out, "  %s disk: layer %s\n", dn, images.ShortID(id))
		}
	}
	if m := rep.Merge; m != nil {
		fmt.Fprintf(out, "  user files merged with the head: version %d is the new head (e2fsck: %s)\n", m.Version, strings.Join(m.Fsck, "; "))
		for _, r := range m.Resolutions {
			line := fmt.Sprintf("    %s: %s → %s", r.Path, r.Case, r.Action)
			if r.Copy != "" {
				line += " (the other's kept as " + r.Copy + ")"
			}
			fmt.Fprintln(out, line)
		}
	}
	if rep.Released {
		fmt.Fprintf(out, "  lease released; the local copy is removed\n")
	}
}

// newReleaseCommand is `cvd release`: give a lease back without checking in.
func newReleaseCommand(g *globalOptions) *cobra.Command {
	var discard bool
	c := &cobra.Command{
		Use:     "release DESKTOP",
		Short:   "Give a checked-out desktop's lease back and remove the local copy (refused with changes not checked in)",
		Example: `  cvd release alice`,
		Args:    cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			lp, done, err := openLaptop(g, cmd.ErrOrStderr())
			if err != nil {
				return err
			}
			defer done()
			if err := lp.Release(cmd.Context(), args[0], discard); err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "released %s at %s\n", args[0], time.Now().Format(time.RFC3339))
			return nil
		},
	}
	c.Flags().BoolVar(&discard, "discard", false, "release even with changes that were not checked in (they are lost)")
	return c
}
