package main

import (
	"fmt"
	"io"
	"text/tabwriter"

	"github.com/spf13/cobra"

	"github.com/cvd-project/cvd/desktop"
	"github.com/cvd-project/cvd/files"
)

func newDesktopFilesCommand(g *globalOptions) *cobra.Command {
	var version int
	var diskName string
	c := &cobra.Command{
		Use:   "files NAME [--version V] [--disk system|user]",
		Short: "List the files of a desktop version: path, type, mode, owner, size, mtime, sha256",
		Long: `List the files of a version of the desktop (default: its head), read in process
and read-only from the layer its disk stands on, through the whole chain: the
partition table (GPT, MBR or none) and each ext4 file system on it. Regular files
get their SHA-256. A layer's manifest is cached in the store's catalog (a layer's
ID names its content): the next listing of a version on it reads no file system.`,
		Example: `  cvd desktop files alice
  cvd desktop files alice --version 3 --disk user --json`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			st, err := openStore(g, false) // writable: manifests are cached in the catalog
			if err != nil {
				return err
			}
			defer st.Close()
			fss, err := desktop.VersionFiles(cmd.Context(), st, args[0], version, diskName)
			if err != nil {
				return err
			}
			if g.json {
				return printJSON(cmd.OutOrStdout(), fss)
			}
			return printFiles(cmd.OutOrStdout(), fss)
		},
	}
	c.Flags().IntVar(&version, "version", 0, "the version (default: the head)")
	c.Flags().StringVar(&diskName, "disk", desktop.DiskSystem, "system or user")
	return c
}

func printFiles(w io.Writer, fss []files.FileSystem) error {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	for _, fs := range fss {
		fmt.Fprintf(tw, "# partition %d: %s %q, %d bytes at %d\n", fs.Partition, fs.Type, fs.Label, fs.Size, fs.Start)
		fmt.Fprintln(tw, "MODE\tUID:GID\tSIZE\tMTIME\tSHA256\tPATH")
		for _, e := range fs.Files {
			sum, name := "-", e.Path
			if e.SHA256 != "" {
				sum = e.SHA256[:16]
			}
			if e.Target != "" {
				name += " -> " + e.Target
			}
			fmt.Fprintf(tw, "%s %s\t%d:%d\t%d\t%s\t%s\t%s\n", typeLetter(e.Type), e.Mode, e.UID, e.GID, e.Size, e.MTime.Format("2006-01-02T15:04:05Z"), sum, name)
		}
	}
	return tw.Flush()
}

func typeLetter(t string) string {
	switch t {
	case "dir":
		return "d"
	case "symlink":
		return "l"
	case "file":
		return "-"
	}
	return "?"
}

func newDesktopDiffCommand(g *globalOptions) *cobra.Command {
	var from, to int
	var diskName string
	var byFiles bool
	c := &cobra.Command{
		Use:   "diff NAME --files --from V1 --to V2 [--disk system|user]",
		Short: "List the files added, changed and removed between two versions of a desktop",
		Long: `Compare two versions of the desktop file by file (--files): every file added,
removed, or changed in content, type, mode, owner or link target (a modification
time alone is not a change), per file system of the disk.`,
		Example: `  cvd desktop diff alice --files --from 2 --to 5
  cvd desktop diff alice --files --from 2 --to 5 --disk user --json`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if !byFiles {
				return &exitError{code: exitUsage, err: fmt.Errorf("give --files (a file-level diff; cvd disk diff compares blocks)")}
			}
			if from == 0 || to == 0 {
				return &exitError{code: exitUsage, err: fmt.Errorf("give --from and --to")}
			}
			st, err := openStore(g, false)
			if err != nil {
				return err
			}
			defer st.Close()
			ds, err := desktop.DiffFiles(cmd.Context(), st, args[0], from, to, diskName)
			if err != nil {
				return err
			}
			if g.json {
				return printJSON(cmd.OutOrStdout(), ds)
			}
			for _, d := range ds {
				fmt.Fprintf(cmd.OutOrStdout(), "# partition %d: %d changes\n", d.Partition, len(d.Changes))
				for _, c := range d.Changes {
					fmt.Fprintf(cmd.OutOrStdout(), "%-8s %s\n", c.Kind, c.Path)
				}
			}
			return nil
		},
	}
	c.Flags().BoolVar(&byFiles, "files", false, "compare file by file")
	c.Flags().IntVar(&from, "from", 0, "the older version")
	c.Flags().IntVar(&to, "to", 0, "the newer version")
	c.Flags().StringVar(&diskName, "disk", desktop.DiskSystem, "system or user")
	return c
}
