package main

import (
	"fmt"
	"time"

	"github.com/spf13/cobra"

	"github.com/cvd-project/cvd/images"
	"github.com/cvd-project/cvd/syncd"
)

func newExportCommand(g *globalOptions) *cobra.Command {
	var (
		out    string
		device string
		ttl    time.Duration
		skip   []string
	)
	c := &cobra.Command{
		Use:   "export DESKTOP -o FILE",
		Short: "Write a desktop's head version into an offline bundle (xz) for a laptop that never reaches the server",
		Long: `Write the head version of a desktop of this (server's) store into one
xz-compressed file: its manifest and the cluster streams of its layers. ` + "`cvd import`" + `
on the laptop checks every cluster against its digest and every layer against its
ID, so the layers keep their IDs. The imported copy is purged after --ttl.
With --device, the desktop's lease is taken for that device, as a check-out
would.`,
		Example: `  cvd export alice -o alice.cvdb --ttl 720h --device alice-laptop`,
		Args:    cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if out == "" {
				return &exitError{code: exitUsage, err: fmt.Errorf("give -o FILE")}
			}
			if err := images.CheckObjectName("desktop", args[0]); err != nil {
				return storeError(err)
			}
			srv, done, err := openAdmin(g)
			if err != nil {
				return err
			}
			defer done()
			rep, err := srv.Export(cmd.Context(), args[0], out, syncd.ExportOptions{TTL: ttl, Device: device, Skip: skip})
			if err != nil {
				return err
			}
			if g.json {
				return printJSON(cmd.OutOrStdout(), rep)
			}
			fmt.Fprintf(cmd.OutOrStdout(), "exported %s version %d: %d layers, %s (%d bytes; %s before xz) in %.2fs; the copy expires %s\n",
				args[0], rep.Header.Version, rep.Layers, fmtBytes(rep.Bytes), rep.Bytes, fmtBytes(rep.Stream), rep.Took,
				rep.Header.Expires.Local().Format(time.RFC3339))
			return nil
		},
	}
	f := c.Flags()
	f.StringVarP(&out, "output", "o", "", "bundle file to write (must not exist)")
	f.StringVar(&device, "device", "", "take the desktop's lease for this device")
	f.DurationVar(&ttl, "ttl", 7*24*time.Hour, "how long the imported copy lives")
	f.StringArrayVar(&skip, "skip-layer", nil, "leave out a layer the laptop already holds (full ID, repeatable)")
	return c
}

func newImportCommand(g *globalOptions) *cobra.Command {
	return &cobra.Command{
		Use:     "import FILE",
		Short:   "Read an offline bundle (from `cvd export`) into the local store",
		Example: `  cvd import alice.cvdb --store ~/cvd`,
		Args:    cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			lp, done, err := openLaptop(g, cmd.ErrOrStderr())
			if err != nil {
				return err
			}
			defer done()
			rep, err := lp.ImportBundle(cmd.Context(), args[0])
			if err != nil {
				return storeError(err)
			}
			if g.json {
				return printJSON(cmd.OutOrStdout(), rep)
			}
			fmt.Fprintf(cmd.OutOrStdout(), "imported %s version %d: %d layers written, %d already held; expires %s\n",
				rep.Desktop, rep.Version, len(rep.LayersWritten), len(rep.LayersHeld), rep.Expires.Local().Format(time.RFC3339))
			return nil
		},
	}
}
