package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"

	"github.com/spf13/cobra"

	"github.com/cvd-project/cvd/disk"
	"github.com/cvd-project/cvd/images"
)

// newDiskCommand is `cvd disk`: the qemu-img/qemu-io of cvd. Every subcommand
// opens images through disk.Open with the roots given by --allow-root.
func newDiskCommand(g *globalOptions) *cobra.Command {
	c := &cobra.Command{
		Use:   "disk",
		Short: "Inspect, create, read and write disk images (the qemu-img/qemu-io of cvd)",
		Long: `Inspect, create, read and write qcow2 (v2, v3) and raw disk images and their
backing chains.

A backing file named inside an image is resolved relative to that image's
directory and must stay inside the image's own directory or a directory given
with --allow-root; absolute paths and ".." escapes elsewhere are refused.
Formats cvd does not handle (vmdk, vhdx, vdi, ...) are named and refused:
convert them first with qemu-img convert -O qcow2.

Sizes and offsets accept the suffixes K, M, G, T, P (powers of 1024): 512, 64K, 10G.

Encrypted qcow2 (LUKS, as qemu-img makes it with encrypt.format=luks) opens with
--key-file FILE, a file holding the passphrase (QEMU's secret); give it several
times for a chain whose layers have different keys: each is tried on every
encrypted layer. Without a key the metadata commands (info, map, check) work and
reading data fails. create and convert --encrypt encrypt the new image with the
first --key-file.

` + exitCodesHelp,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error { return cmd.Help() },
	}
	c.PersistentFlags().StringArray("allow-root", nil, "directory that backing files may resolve into (repeatable)")
	c.PersistentFlags().StringArray("key-file", nil, "file holding the passphrase of encrypted (LUKS) layers (repeatable)")
	c.PersistentPreRunE = func(cmd *cobra.Command, args []string) error {
		keys, err := diskKeys(cmd)
		if err != nil {
			return err
		}
		if len(keys) > 0 {
			disk.AddKeyring(disk.Keys(keys...))
		}
		return nil
	}
	c.AddCommand(
		newDiskCreateCommand(g),
		newDiskInfoCommand(g),
		newDiskMapCommand(g),
		newDiskCheckCommand(g),
		newDiskConvertCommand(g),
		newDiskCompareCommand(g),
		newDiskReadCommand(g),
		newDiskWriteCommand(g),
		newDiskZeroCommand(g),
		newDiskDiscardCommand(g),
		newDiskRebaseCommand(g),
		newDiskDiffCommand(g),
		newDiskCommitCommand(g),
		newDiskFlattenCommand(g),
	)
	return c
}

// allowRoots returns the --allow-root values inherited from `cvd disk`.
func allowRoots(cmd *cobra.Command) []string {
	if f := cmd.Flags().Lookup("allow-root"); f != nil {
		if v, err := cmd.Flags().GetStringArray("allow-root"); err == nil {
			return v
		}
	}
	return nil
}

// diskKeys reads the --key-file passphrases (a trailing newline is not part
// of one).
func diskKeys(cmd *cobra.Command) ([][]byte, error) {
	files, err := cmd.Flags().GetStringArray("key-file")
	if err != nil {
		return nil, nil
	}
	var keys [][]byte
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			return nil, &exitError{code: exitUsage, err: fmt.Errorf("--key-file: %w", err)}
		}
		b = []byte(strings.TrimRight(string(b), "\r\n"))
		if len(b) == 0 {
			return nil, &exitError{code: exitUsage, err: fmt.Errorf("--key-file %s is empty", f)}
		}
		keys = append(keys, b)
	}
	return keys, nil
}

// encryptionOf is the encryption --encrypt asks for: the first --key-file.
func encryptionOf(cmd *cobra.Command, encrypt bool) (*disk.Encryption, error) {
	if !encrypt {
		return nil, nil
	}
	keys, err := diskKeys(cmd)
	if err != nil {
		return nil, err
	}
	if len(keys) == 0 {
		return nil, &exitError{code: exitUsage, err: fmt.Errorf("--encrypt needs --key-file (the new image's passphrase)")}
	}
	return &disk.Encryption{Key: keys[0]}, nil
}

// openImage probes path and opens it with its chain. A format cvd does not
// handle gets a message that names it and says what to do.
func openImage(path string, opts disk.OpenOptions) (disk.Image, error) {
	if root := storeRoot(path); root != "" {
		// A store's tops name their layers as ../layers/<id>.qcow2.
		opts.AllowedRoots = append(opts.AllowedRoots, root)
	}
	if !opts.ReadOnly {
		if err := refuseSealed(path); err != nil {
			return nil, err
		}
	}
	if opts.Format == "" {
		f, err := probe(path)
		if err != nil {
			return nil, err
		}
		opts.Format = f
	}
	img, err := disk.Open(path, opts)
	if err != nil {
		return nil, explainOpenError(path, err)
	}
	return img, nil
}

func probe(path string) (disk.Format, error) {
	f, err := disk.Probe(path)
	if err != nil {
		return "", explainOpenError(path, err)
	}
	return f, nil
}

func explainOpenError(path string, err error) error {
	switch {
	case errors.Is(err, os.ErrNotExist):
		return fmt.Errorf("%s: no such file", path)
	case errors.Is(err, disk.ErrUnsupported) && strings.Contains(err.Error(), "qemu-img convert"):
		return fmt.Errorf("%s: %w", path, err)
	case errors.Is(err, disk.ErrUnsupported):
		return fmt.Errorf("%s: %w (cvd reads and writes qcow2 and raw only; convert it first: qemu-img convert -O qcow2 %s out.qcow2)", path, err, path)
	case errors.Is(err, disk.ErrBackingEscape):
		return fmt.Errorf("%s: %w (allow its directory with --allow-root DIR)", path, err)
	}
	if strings.Contains(err.Error(), path) {
		return err
	}
	return fmt.Errorf("%s: %w", path, err)
}

// closeImage closes img and keeps the first error.
// openImagePair opens two images read-only (compare, diff); when the second
// does not open, the first is closed again. The caller closes both.
func openImagePair(a, b string, roots []string) (disk.Image, disk.Image, error) {
	ia, err := openImage(a, disk.OpenOptions{ReadOnly: true, AllowedRoots: roots})
	if err != nil {
		return nil, nil, err
	}
	ib, err := openImage(b, disk.OpenOptions{ReadOnly: true, AllowedRoots: roots})
	if err != nil {
		ia.Close()
		return nil, nil, err
	}
	return ia, ib, nil
}

func closeImage(img disk.Image, errp *error) {
	if err := img.Close(); err != nil && *errp == nil {
		*errp = err
	}
}

// sizeRE is a byte count: a number, an optional binary unit, an optional "B"
// ("iB" after a unit).
var sizeRE = regexp.MustCompile(`^([0-9]+(?:\.[0-9]+)?)(?:([KMGTPE])(?:I?B)?|B)?$`)

// parseSize reads a byte count with an optional binary suffix: 512, 64K, 64KiB,
// 10G, 1.5M, 1T. A bare number is bytes.
func parseSize(s string) (int64, error) {
	m := sizeRE.FindStringSubmatch(strings.ToUpper(strings.TrimSpace(s)))
	if m == nil {
		return 0, fmt.Errorf("invalid size %q (use a number with an optional K, M, G, T or P suffix)", s)
	}
	shift := map[string]uint{"": 0, "K": 10, "M": 20, "G": 30, "T": 40, "P": 50, "E": 60}[m[2]]
	if strings.Contains(m[1], ".") {
		f, err := strconv.ParseFloat(m[1], 64)
		v := f * float64(uint64(1)<<shift)
		if err != nil || v >= math.MaxInt64 || v != math.Trunc(v) {
			return 0, fmt.Errorf("invalid size %q: not a whole number of bytes or too large", s)
		}
		return int64(v), nil
	}
	n, err := strconv.ParseInt(m[1], 10, 64)
	if err != nil || n > math.MaxInt64>>shift {
		return 0, fmt.Errorf("invalid size %q: too large", s)
	}
	return n << shift, nil
}

// parseRate reads --bwlimit: bytes per second with an optional binary suffix
// ("" and 0: no cap).
func parseRate(s string) (int64, error) {
	if s == "" {
		return 0, nil
	}
	n, err := parseSize(strings.TrimSuffix(strings.TrimSuffix(s, "/s"), "ps"))
	if err != nil {
		return 0, &exitError{code: exitUsage, err: fmt.Errorf("--bwlimit: %w", err)}
	}
	return n, nil
}

// humanSize prints n in the largest binary unit that keeps it readable, as
// qemu-img does: "64 KiB", "10 GiB", "1.5 MiB".
func humanSize(n int64) string {
	units := []string{"B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"}
	f := float64(n)
	i := 0
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

// checkRange refuses an access outside the virtual disk before any I/O.
func checkRange(img disk.Image, off, n int64) error {
	if off < 0 || n < 0 || off > img.Size() || n > img.Size()-off {
		return fmt.Errorf("%s: range [%d, %d) is outside the disk (size %d): %w", img.Info().Path, off, off+n, img.Size(), disk.ErrOutOfRange)
	}
	return nil
}

// writeJSON prints v indented, one document per call.
func writeJSON(out io.Writer, v any) error {
	enc := json.NewEncoder(out)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

// parseFormat accepts "qcow2" and "raw" (and "" for probing).
func parseFormat(s string) (disk.Format, error) {
	switch strings.ToLower(s) {
	case "":
		return "", nil
	case "qcow2":
		return disk.FormatQcow2, nil
	case "raw":
		return disk.FormatRaw, nil
	}
	return "", &exitError{code: exitUsage, err: fmt.Errorf("unknown format %q: cvd handles qcow2 and raw", s)}
}

// storeRoot is the store directory that holds path (a file of its layers/,
// desktops/ or clones/ directory), or "".
func storeRoot(path string) string {
	abs, err := filepath.Abs(path)
	if err != nil {
		return ""
	}
	if real, err := filepath.EvalSymlinks(abs); err == nil {
		abs = real
	}
	dir := filepath.Dir(abs)
	switch filepath.Base(dir) {
	case images.LayersDir, images.DesktopsDir, images.ClonesDir:
	default:
		return ""
	}
	root := filepath.Dir(dir)
	for _, f := range []string{images.CatalogFile, images.ConfigFile, images.LegacyDBFile} {
		if _, err := os.Stat(filepath.Join(root, f)); err == nil {
			return root
		}
	}
	return ""
}

// refuseSealed refuses to write path when it is a sealed layer of a store, or a
// file without write permission (root could write it; cvd does not).
func refuseSealed(path string) error {
	fi, err := os.Stat(path)
	if err != nil {
		return explainOpenError(path, err)
	}
	if root := storeRoot(path); root != "" && filepath.Base(filepath.Dir(path)) == images.LayersDir {
		return &exitError{code: exitFailure, err: fmt.Errorf("%s: %w: a sealed layer of store %s is never written "+
			"(every clone and desktop on it reads it); write a desktop's or a clone's top, or seal a new layer", path, disk.ErrReadOnly, root)}
	}
	if fi.Mode().Perm()&0o222 == 0 {
		return &exitError{code: exitFailure, err: fmt.Errorf("%s: %w: the file is read-only (mode %v); cvd does not write it, "+
			"also as root (chmod u+w it if it is meant to change)", path, disk.ErrReadOnly, fi.Mode().Perm())}
	}
	return nil
}
