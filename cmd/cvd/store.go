package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"math"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/cvd-project/cvd/syncd/laptop"

	"github.com/spf13/cobra"
	"golang.org/x/term"

	"github.com/cvd-project/cvd/images"
	"github.com/cvd-project/cvd/vm"
)

// openStore opens the store named by --store (and --catalog), then purges the
// check-outs whose lease expired. A read-only command refuses a store directory
// that does not exist; a store of an earlier release (its bbolt database not
// yet moved into the catalog) is opened read-write once to move it.
func openStore(g *globalOptions, readOnly bool) (*images.Store, error) {
	if readOnly {
		if _, err := os.Stat(g.store); err != nil {
			return nil, fmt.Errorf("no store at %s: %w", g.store, err)
		}
		_, errCat := os.Stat(filepath.Join(g.store, images.CatalogFile))
		_, errCfg := os.Stat(filepath.Join(g.store, images.ConfigFile))
		if errCat != nil && errCfg != nil && g.catalog == "" {
			readOnly = false // nothing to read yet, or an earlier release's store
		}
	}
	ctx := g.ctx
	if ctx == nil {
		ctx = context.Background()
	}
	st, err := images.Open(g.store, images.OpenOptions{ReadOnly: readOnly, Catalog: g.catalog, Context: ctx})
	if err != nil {
		return nil, err
	}
	purgeExpired(g, st)
	return st, nil
}

// purgeExpired removes checked-out copies whose lease has expired: every command
// on a store does it first, offline too (a stat when nothing was ever checked
// out). The local VM of a purged desktop is undefined when libvirt is there. A
// failure is logged, not fatal: the command goes on, and the next one retries.
func purgeExpired(g *globalOptions, st *images.Store) {
	opts := laptop.LaptopOptions{Logger: slog.Default()}
	vms := &vm.Desktops{URI: vm.HookURI(""), Log: slog.Default()}
	defer vms.Close()
	if vms.URI != "" {
		opts.VM = vms
	}
	purged, err := laptop.PurgeExpired(context.Background(), st, opts)
	if err != nil {
		slog.Warn("purge of expired check-outs failed", "store", g.store, "err", err)
	}
	for _, p := range purged {
		slog.Warn("purged a checked-out desktop: its lease expired", "desktop", p.Desktop, "expired", p.Expired.Local().Format(time.RFC3339), "reason", p.Reason)
	}
}

// storeError maps store errors to exit codes: bad names and options are usage
// errors, the rest failures.
func storeError(err error) error {
	if err == nil {
		return nil
	}
	if errors.Is(err, images.ErrInvalid) {
		return &exitError{code: exitUsage, err: err}
	}
	return err
}

func printJSON(out io.Writer, v any) error {
	enc := json.NewEncoder(out)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

func newTable(out io.Writer) *tabwriter.Writer {
	return tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
}

// fmtBytes prints n in binary units: "64 KiB", "1.5 GiB".
func fmtBytes(n int64) string {
	units := []string{"B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"}
	f, i := float64(n), 0
	for f >= 1024 && i < len(units)-1 {
		f /= 1024
		i++
	}
	if i == 0 {
		return fmt.Sprintf("%d B", n)
	}
	if f == math.Trunc(f) {
		return fmt.Sprintf("%.0f %s", f, units[i])
	}
	return fmt.Sprintf("%.3g %s", f, units[i])
}

var byteSizeRE = regexp.MustCompile(`^([0-9]+)([KMGTP]?)(I?B)?$`)

// parseByteSize reads 512, 64K, 10G, 10GiB.
func parseByteSize(s string) (int64, error) {
	m := byteSizeRE.FindStringSubmatch(strings.ToUpper(strings.TrimSpace(s)))
	if m == nil {
		return 0, &exitError{code: exitUsage, err: fmt.Errorf("invalid size %q (a number with an optional K, M, G, T or P suffix)", s)}
	}
	n, err := strconv.ParseInt(m[1], 10, 64)
	shift := map[string]uint{"": 0, "K": 10, "M": 20, "G": 30, "T": 40, "P": 50}[m[2]]
	if err != nil || n > math.MaxInt64>>shift {
		return 0, &exitError{code: exitUsage, err: fmt.Errorf("invalid size %q: too large", s)}
	}
	return n << shift, nil
}

// progressFunc prints a progress line on stderr when it is a terminal, and
// nothing in a pipe. done returns the function to call at the end.
func progressFunc(cmd *cobra.Command, what string) (func(done, total int64), func()) {
	f, ok := cmd.ErrOrStderr().(*os.File)
	if !ok || !term.IsTerminal(int(f.Fd())) {
		return nil, func() {}
	}
	shown := false
	return func(done, total int64) {
			shown = true
			pct := 100.0
			if total > 0 {
				pct = float64(done) * 100 / float64(total)
			}
			fmt.Fprintf(f, "\r%s: %5.1f%%", what, pct)
		}, func() {
			if shown {
				fmt.Fprint(f, "\r\033[K")
			}
		}
}

func newStoreCommand(g *globalOptions) *cobra.Command {
	c := &cobra.Command{
		Use:   "store",
		Short: "Inspect and check the layer store",
		Long: `The store is a directory (--store, or CVD_STORE) that holds sealed layers
(layers/<id>.qcow2, read-only), the writable tops of desktops and clones, clone
seed images, and its catalog, the database that says what all of them are
(catalog.db, SQLite; or PostgreSQL: --catalog, remembered in config.json).`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error { return cmd.Help() },
	}
	c.AddCommand(newStoreCheckCommand(g), newStoreInfoCommand(g))
	return c
}

type storeCheckOptions struct {
	deep     bool
	readOnly bool
}

func newStoreCheckCommand(g *globalOptions) *cobra.Command {
	opts := &storeCheckOptions{}
	c := &cobra.Command{
		Use:   "check",
		Short: "Report inconsistencies between the store's database and its files",
		Example: `  cvd store check
  cvd store check --deep --json`,
		Long: `Check the store: every record's files exist, every file belongs to a record,
sealed layers are read-only and unchanged since they were sealed (size and
modification time), every reference names an existing layer, desktop or clone.
With --deep every layer's ID is recomputed from its content and every image's
refcounts are checked as qemu-img check does.

Opening the store read-write first finishes or undoes an operation that a crash
interrupted, and says so; --read-only reports such leftovers instead.

Exit codes: 0 clean, 2 problems found, 1 the check itself failed.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			return runStoreCheck(cmd.Context(), g, opts, cmd.OutOrStdout())
		},
	}
	c.Flags().BoolVar(&opts.deep, "deep", false, "also recompute layer IDs and check every image's refcounts")
	c.Flags().BoolVar(&opts.readOnly, "read-only", false, "open the store read-only: do not recover, report leftovers")
	return c
}

func runStoreCheck(ctx context.Context, g *globalOptions, opts *storeCheckOptions, out io.Writer) error {
	st, err := openStore(g, opts.readOnly)
	if err != nil {
		return err
	}
	defer st.Close()
	rep, err := st.Check(ctx, images.CheckOptions{Deep: opts.deep})
	if err != nil {
		return err
	}
	if g.json {
		if err := printJSON(out, rep); err != nil {
			return err
		}
	} else {
		for _, r := range rep.Recovered {
			fmt.Fprintln(out, "recovered:", r)
		}
		for _, p := range rep.Problems {
			fmt.Fprintln(out, p)
		}
		if rep.OK() {
			fmt.Fprintf(out, "store %s is clean: %d layers, %d desktops, %d clones\n", st.Dir(), rep.Layers, rep.Desktops, rep.Clones)
		}
	}
	if !rep.OK() {
		return &exitError{code: exitUsage, err: fmt.Errorf("store check: %d problems", len(rep.Problems)), quiet: g.json}
	}
	return nil
}

func newStoreInfoCommand(g *globalOptions) *cobra.Command {
	return &cobra.Command{
		Use:     "info",
		Short:   "Show the store's directory, what it holds and the space it takes",
		Example: `  cvd store info --json`,
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			return runStoreInfo(g, cmd.OutOrStdout())
		},
	}
}

type storeInfo struct {
	Dir           string `json:"dir"`
	Layers        int    `json:"layers"`
	Desktops      int    `json:"desktops"`
	Clones        int    `json:"clones"`
	LayerBytes    int64  `json:"layer_bytes"`    // space on disk
	DesktopBytes  int64  `json:"desktop_bytes"`  // space on disk
	CloneBytes    int64  `json:"clone_bytes"`    // space on disk
	DatabaseBytes int64  `json:"database_bytes"` // space on disk (SQLite: the file and its WAL)
	Catalog       string `json:"catalog"`        // where the catalog is (a PostgreSQL URL without its password)
}

func runStoreInfo(g *globalOptions, out io.Writer) error {
	st, err := openStore(g, true)
	if err != nil {
		return err
	}
	defer st.Close()
	ls, err := st.Layers()
	if err != nil {
		return err
	}
	ds, err := st.Desktops()
	if err != nil {
		return err
	}
	cs, err := st.Clones()
	if err != nil {
		return err
	}
	info := storeInfo{Dir: st.Dir(), Layers: len(ls), Desktops: len(ds), Clones: len(cs),
		LayerBytes: diskUsage(st.Path(images.LayersDir)), DesktopBytes: diskUsage(st.Path(images.DesktopsDir)),
		CloneBytes: diskUsage(st.Path(images.ClonesDir)), Catalog: st.Catalog().Redacted()}
	if p := st.Catalog().Path(); p != "" {
		info.DatabaseBytes = diskUsage(p) + diskUsage(p+"-wal")
	}
	if g.json {
		return printJSON(out, info)
	}
	tw := newTable(out)
	fmt.Fprintf(tw, "store\t%s\n", info.Dir)
	fmt.Fprintf(tw, "layers\t%d\t%s\n", info.Layers, fmtBytes(info.LayerBytes))
	fmt.Fprintf(tw, "desktops\t%d\t%s\n", info.Desktops, fmtBytes(info.DesktopBytes))
	fmt.Fprintf(tw, "clones\t%d\t%s\n", info.Clones, fmtBytes(info.CloneBytes))
	if info.DatabaseBytes > 0 {
		fmt.Fprintf(tw, "catalog\t%s\t%s\n", info.Catalog, fmtBytes(info.DatabaseBytes))
	} else {
		fmt.Fprintf(tw, "catalog\t%s\n", info.Catalog)
	}
	return tw.Flush()
}

// diskUsage is the space the files under p take on disk.
func diskUsage(p string) int64 {
	var n int64
	filepath.WalkDir(p, func(_ string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return nil
		}
		if fi, err := d.Info(); err == nil {
			if s, ok := fi.Sys().(*syscall.Stat_t); ok {
				n += s.Blocks * 512
			}
		}
		return nil
	})
	return n
}
