package main

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"

	"github.com/spf13/cobra"
)

// globalOptions are the flags every command shares.
type globalOptions struct {
	store    string
	catalog  string
	ctx      context.Context // the command's: cancelled by Ctrl-C and SIGTERM
	json     bool
	logLevel string
}

func defaultStore() string {
	if s := os.Getenv("CVD_STORE"); s != "" {
		return s
	}
	if d := os.Getenv("XDG_DATA_HOME"); d != "" {
		return filepath.Join(d, "cvd")
	}
	if h, err := os.UserHomeDir(); err == nil {
		return filepath.Join(h, ".local", "share", "cvd")
	}
	return "cvd-store"
}

func newRootCommand() *cobra.Command { return newRootCommandWith(&globalOptions{}) }

// newRootCommandWith builds the command tree over g, which holds the global flags
// once the command line is parsed.
func newRootCommandWith(g *globalOptions) *cobra.Command {
	cobra.EnableTraverseRunHooks = true // cvd disk's hook (keys) runs after the root's
	root := &cobra.Command{
		Use:   "cvd",
		Short: "Block-level virtual disks and linked clones for virtual desktops",
		Long: `cvd manages desktops as chains of qcow2 disks (base → app layers → user delta):
it creates linked clones in milliseconds, recomposes desktops onto new layers, runs
them under libvirt, and syncs them to laptops for offline use moving only the
clusters that changed.

` + exitCodesHelp,
		SilenceUsage:  true,
		SilenceErrors: true,
		PersistentPreRunE: func(cmd *cobra.Command, args []string) error {
			g.ctx = cmd.Context()
			return setupLogging(cmd.ErrOrStderr(), g.logLevel)
		},
	}
	pf := root.PersistentFlags()
	pf.StringVar(&g.store, "store", defaultStore(), "store directory (env CVD_STORE)")
	pf.StringVar(&g.catalog, "catalog", os.Getenv("CVD_CATALOG"),
		"the store's catalog when it is not the embedded SQLite file: postgres://… (env CVD_CATALOG; remembered by the store)")
	pf.BoolVar(&g.json, "json", false, "print machine-readable JSON")
	pf.StringVar(&g.logLevel, "log-level", "warn", "log level: debug, info, warn, error")

	root.AddCommand(
		newVersionCommand(g),
		newDiskCommand(g),
		newLayerCommand(g),
		newDesktopCommand(g),
		newCloneCommand(g),
		newGCCommand(g),
		newStoreCommand(g),
		newServeCommand(g),
		newDeviceCommand(g),
		newCheckoutCommand(g),
		newCheckinCommand(g),
		newReleaseCommand(g),
		newStatusCommand(g),
		newAgentCommand(g),
		newExportCommand(g),
		newImportCommand(g),
		newRecomposeCommand(g),
		newVMCommand(g),
		newProvisionCommand(g),
		newPullCommand(g),
		newFollowCommand(g),
		newStreamCommand(g),
		newPinCommand(g),
		newOpenCommand(g),
		newVariantCommand(g),
	)
	return root
}

func setupLogging(w io.Writer, level string) error {
	var l slog.Level
	if err := l.UnmarshalText([]byte(level)); err != nil {
		return &exitError{code: exitUsage, err: fmt.Errorf("--log-level: %w", err)}
	}
	slog.SetDefault(slog.New(slog.NewTextHandler(w, &slog.HandlerOptions{Level: l})))
	return nil
}
