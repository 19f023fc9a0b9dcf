package main

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/spf13/cobra"

	"github.com/cvd-project/cvd/internal/testutil"
)

func TestParseSize(t *testing.T) {
	tests := []struct {
		name string
		in   string
		want int64
		bad  bool
	}{
		{name: "bytes", in: "512", want: 512},
		{name: "zero", in: "0", want: 0},
		{name: "K", in: "64K", want: 64 << 10},
		{name: "lower k", in: "64k", want: 64 << 10},
		{name: "KiB", in: "64KiB", want: 64 << 10},
		{name: "KB", in: "64KB", want: 64 << 10},
		{name: "M", in: "2M", want: 2 << 20},
		{name: "G", in: "10G", want: 10 << 30},
		{name: "T", in: "1T", want: 1 << 40},
		{name: "P", in: "1P", want: 1 << 50},
		{name: "B suffix", in: "4096B", want: 4096},
		{name: "fraction", in: "1.5M", want: 3 << 19},
		{name: "spaces", in: " 1G ", want: 1 << 30},
		{name: "empty", in: "", bad: true},
		{name: "negative", in: "-1", bad: true},
		{name: "unit only", in: "K", bad: true},
		{name: "unknown unit", in: "10Q", bad: true},
		{name: "iB alone", in: "10iB", bad: true},
		{name: "overflow", in: "9E", bad: true},
		{name: "huge", in: "99999999999999999999", bad: true},
		{name: "fraction of a byte", in: "0.5", bad: true},
		{name: "hex", in: "0x10", bad: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := parseSize(tt.in)
			if tt.bad {
				if err == nil {
					t.Fatalf("parseSize(%q) = %d, want an error", tt.in, got)
				}
				return
			}
			if err != nil || got != tt.want {
				t.Fatalf("parseSize(%q) = %d, %v; want %d", tt.in, got, err, tt.want)
			}
		})
	}
}

func TestHumanSize(t *testing.T) {
	for in, want := range map[int64]string{
		0: "0 B", 512: "512 B", 64 << 10: "64 KiB", 10 << 30: "10 GiB", 3 << 19: "1.5 MiB", 1 << 40: "1 TiB",
	} {
		if got := humanSize(in); got != want {
			t.Errorf("humanSize(%d) = %q, want %q", in, got, want)
		}
	}
}

// TestDiskCommandsDocumented: every subcommand has a usage line, examples and an
// argument validator, and --help works through the root command.
func TestDiskCommandsDocumented(t *testing.T) {
	root := newRootCommand()
	var diskCmd *cobra.Command
	for _, c := range root.Commands() {
		if c.Name() == "disk" {
			diskCmd = c
		}
	}
	if diskCmd == nil {
		t.Fatal("no disk command")
	}
	want := []string{"create", "info", "map", "check", "convert", "compare", "read", "write", "zero", "discard"}
	have := map[string]*cobra.Command{}
	for _, c := range diskCmd.Commands() {
		have[c.Name()] = c
	}
	for _, name := range want {
		c := have[name]
		if c == nil {
			t.Errorf("cvd disk %s missing", name)
			continue
		}
		if c.Example == "" || c.Args == nil || c.RunE == nil || c.Short == "" {
			t.Errorf("cvd disk %s: needs Short, Example, Args and RunE", name)
		}
		out, _, err := diskExec(t, "disk", name, "--help")
		if err != nil || !strings.Contains(out, "Examples:") {
			t.Errorf("cvd disk %s --help: %v\n%s", name, err, out)
		}
	}
	if diskCmd.PersistentFlags().Lookup("allow-root") == nil {
		t.Error("cvd disk has no --allow-root")
	}
}

// TestDiskUsageErrors: bad command lines exit 2 before touching any file.
func TestDiskUsageErrors(t *testing.T) {
	dir := t.TempDir()
	img := filepath.Join(dir, "a.qcow2")
	tests := []struct {
		name string
		args []string
	}{
		{name: "create without size or backing", args: []string{"disk", "create", img}},
		{name: "create bad size", args: []string{"disk", "create", img, "10Q"}},
		{name: "create zero size", args: []string{"disk", "create", img, "0"}},
		{name: "create bad cluster size", args: []string{"disk", "create", "--cluster-size", "3K", img, "1M"}},
		{name: "create cluster size too big", args: []string{"disk", "create", "--cluster-size", "4M", img, "1M"}},
		{name: "create bad compression", args: []string{"disk", "create", "--compression", "lz4", img, "1M"}},
		{name: "create -F without -b", args: []string{"disk", "create", "-F", "raw", img, "1M"}},
		{name: "create bad backing format", args: []string{"disk", "create", "-b", "x", "-F", "vmdk", img, "1M"}},
		{name: "info no args", args: []string{"disk", "info"}},
		{name: "read missing length", args: []string{"disk", "read", img, "0"}},
		{name: "read bad offset", args: []string{"disk", "read", img, "x", "1"}},
		{name: "convert bad format", args: []string{"disk", "convert", "-O", "vmdk", img, img + ".out"}},
		{name: "convert compress raw", args: []string{"disk", "convert", "-O", "raw", "-c", "zstd", img, img + ".out"}},
		{name: "convert bad compress", args: []string{"disk", "convert", "-c", "lzma", img, img + ".out"}},
		{name: "unknown flag", args: []string{"disk", "map", "--bogus", img}},
		{name: "compare one arg", args: []string{"disk", "compare", img}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, _, err := diskExec(t, tt.args...)
			if code := exitCode(err); code != exitUsage {
				t.Fatalf("exit %d (%v), want %d", code, err, exitUsage)
			}
			if _, err := os.Stat(img); err == nil {
				t.Fatalf("%s was created", img)
			}
		})
	}
}

// TestDiskCLIRoundTrip drives every command on a three-deep chain and checks the
// results with QEMU.
func TestDiskCLIRoundTrip(t *testing.T) {
	testutil.NeedQemu(t)
	dir := t.TempDir()
	base := filepath.Join(dir, "base.qcow2")
	mid := filepath.Join(dir, "mid.qcow2")
	top := filepath.Join(dir, "top.qcow2")
	for _, p := range []string{base, mid, top} {
		testutil.CheckOnCleanup(t, p)
	}

	diskMust(t, "disk", "create", "--cluster-size", "4K", base, "4M")
	diskMust(t, "disk", "create", "-b", base, mid)
	diskMust(t, "disk", "create", "-b", mid, "-F", "qcow2", top)

	// A shadow raw file gets the same writes through qemu-io, so qemu-img
	// compare is the oracle.
	shadow := filepath.Join(dir, "shadow.raw")
	testutil.Run(t, "qemu-img", "create", "-q", "-f", "raw", shadow, "4M")

	rng := rand.New(rand.NewPCG(1, 2))
	write := func(img string, off int64, n int) {
		t.Helper()
		data := make([]byte, n)
		for i := range data {
			data[i] = byte(rng.IntN(255) + 1)
		}
		f := filepath.Join(dir, "chunk")
		if err := os.WriteFile(f, data, 0o644); err != nil {
			t.Fatal(err)
		}
		diskMust(t, "disk", "write", img, diskItoa(off), f)
		fd, err := os.OpenFile(shadow, os.O_WRONLY, 0)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := fd.WriteAt(data, off); err != nil {
			t.Fatal(err)
		}
		fd.Close()
	}
	write(base, 0, 256<<10)
	write(base, 3<<20, 100_000)
	write(mid, 4096+17, 9000)
	write(mid, 1<<20, 64<<10)
	write(top, 100, 3)
	write(top, 2<<20-1000, 5000)

	// write from stdin
	root := newRootCommand()
	root.SetArgs([]string{"disk", "write", top, "3M", "-"})
	root.SetIn(bytes.NewReader(bytes.Repeat([]byte{0xab}, 4096)))
	root.SetOut(new(bytes.Buffer))
	if err := root.ExecuteContext(context.Background()); err != nil {
		t.Fatalf("write from stdin: %v", err)
	}
	testutil.Run(t, "qemu-io", "-f", "raw", "-c", "write -P 0xab 3M 4096", shadow)

	diskMust(t, "disk", "zero", top, "64K", "8K")
	testutil.Run(t, "qemu-io", "-f", "raw", "-c", "write -z 64K 8K", shadow)
	diskMust(t, "disk", "discard", top, "3276800", "12288")
	testutil.Run(t, "qemu-io", "-f", "raw", "-c", "write -z 3276800 12288", shadow)

	if !testutil.QemuCompare(t, top, shadow) {
		t.Fatal("qemu-img compare: cvd's chain differs from the shadow raw file")
	}
	// cvd compare agrees, and finds a difference.
	if out, _, err := diskExec(t, "disk", "compare", top, shadow); err != nil || !strings.Contains(out, "identical") {
		t.Fatalf("cvd disk compare: %v\n%s", err, out)
	}
	other := filepath.Join(dir, "other.raw")
	testutil.Run(t, "qemu-img", "convert", "-O", "raw", top, other)
	testutil.Run(t, "qemu-io", "-f", "raw", "-c", "write -P 1 1000000 1", other)
	out, _, err := diskExec(t, "disk", "compare", top, other)
	if exitCode(err) != exitFailure || !strings.Contains(out, "1000000") {
		t.Fatalf("compare of differing images: exit %d (%v)\n%s", exitCode(err), err, out)
	}
	_, _, err = diskExec(t, "disk", "compare", top, filepath.Join(dir, "missing"))
	if exitCode(err) != 2 {
		t.Fatalf("compare with a missing image: exit %d (%v), want 2", exitCode(err), err)
	}

	// read matches the shadow at unaligned ranges
	want, err := os.ReadFile(shadow)
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range [][2]int64{{0, 1}, {99, 5}, {4096 + 10, 9100}, {2<<20 - 1001, 5002}, {0, 4 << 20}} {
		got, _, err := diskExec(t, "disk", "read", top, diskItoa(r[0]), diskItoa(r[1]))
		if err != nil {
			t.Fatalf("read %v: %v", r, err)
		}
		if !bytes.Equal([]byte(got), want[r[0]:r[0]+r[1]]) {
			t.Fatalf("read %v differs from the shadow file", r)
		}
	}
	if _, _, err := diskExec(t, "disk", "read", top, "4M", "1"); err == nil {
		t.Fatal("read past the end succeeded")
	}

	// map --json agrees with qemu-img map --output=json, key for key.
	for _, args := range [][]string{{top}, {mid}, {base}} {
		got, _, err := diskExec(t, append([]string{"disk", "map", "--json"}, args...)...)
		if err != nil {
			t.Fatal(err)
		}
		qm := testutil.Run(t, "qemu-img", "map", "--output=json", args[0])
		diskSameJSON(t, "map "+filepath.Base(args[0]), got, qm)
	}
	// human map prints something for every layer that holds data
	out, _, err = diskExec(t, "disk", "map", top)
	if err != nil || !strings.Contains(out, "base.qcow2") || !strings.Contains(out, "top.qcow2") {
		t.Fatalf("map: %v\n%s", err, out)
	}
	// --layer: only the top's own ranges are present
	out, _, err = diskExec(t, "disk", "map", "--layer", "--json", top)
	if err != nil {
		t.Fatal(err)
	}
	var lm []diskMapEntry
	if err := json.Unmarshal([]byte(out), &lm); err != nil {
		t.Fatal(err)
	}
	var present int64
	for _, e := range lm {
		if e.Depth != 0 {
			t.Errorf("--layer entry at depth %d", e.Depth)
		}
		if e.Present {
			present += e.Length
		}
	}
	if present == 0 || present > 8*64<<10 {
		t.Errorf("--layer: %d bytes present in the top layer, want a few clusters", present)
	}

	// info --chain --json lists three layers with their backing names.
	out, _, err = diskExec(t, "disk", "info", "--chain", "--json", top)
	if err != nil {
		t.Fatal(err)
	}
	var layers []diskLayerJSON
	if err := json.Unmarshal([]byte(out), &layers); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	if len(layers) != 3 {
		t.Fatalf("info --chain: %d layers, want 3\n%s", len(layers), out)
	}
	for i, l := range layers {
		if l.Format != "qcow2" || l.VirtualSize != 4<<20 || l.ClusterSize == 0 || l.Version != 3 {
			t.Errorf("layer %d: %+v", i, l)
		}
	}
	if layers[0].BackingFilename != "mid.qcow2" || layers[0].BackingFormat != "qcow2" || layers[1].BackingFilename != "base.qcow2" || layers[2].BackingFilename != "" {
		t.Errorf("backing names: %q (%q), %q, %q", layers[0].BackingFilename, layers[0].BackingFormat, layers[1].BackingFilename, layers[2].BackingFilename)
	}
	if layers[2].ClusterSize != 4096 {
		t.Errorf("base cluster size %d, want 4096", layers[2].ClusterSize)
	}
	out, _, err = diskExec(t, "disk", "info", top)
	if err != nil || !strings.Contains(out, "virtual size: 4 MiB (4194304 bytes)") || !strings.Contains(out, "backing file: mid.qcow2") {
		t.Fatalf("info: %v\n%s", err, out)
	}
	// qemu-img agrees on the backing chain.
	qi := testutil.Run(t, "qemu-img", "info", "--output=json", "--backing-chain", top)
	var qlayers []struct {
		Filename    string `json:"filename"`
		VirtualSize int64  `json:"virtual-size"`
		ClusterSize int    `json:"cluster-size"`
		BackingFmt  string `json:"backing-filename-format"`
	}
	if err := json.Unmarshal([]byte(qi), &qlayers); err != nil || len(qlayers) != 3 {
		t.Fatalf("qemu-img info: %v\n%s", err, qi)
	}
	for i := range qlayers {
		if qlayers[i].ClusterSize != layers[i].ClusterSize || qlayers[i].VirtualSize != layers[i].VirtualSize || qlayers[i].BackingFmt != layers[i].BackingFormat {
			t.Errorf("layer %d: qemu-img says %+v, cvd %+v", i, qlayers[i], layers[i])
		}
	}

	// check: clean, JSON, exit 0.
	out, _, err = diskExec(t, "disk", "check", top)
	if err != nil || !strings.Contains(out, "No errors") {
		t.Fatalf("check: %v\n%s", err, out)
	}

	// convert to qcow2, zstd-compressed qcow2 and raw: each compares identical.
	for _, tc := range []struct {
		name string
		args []string
	}{
		{name: "flat.qcow2"},
		{name: "flat-zstd.qcow2", args: []string{"-c", "zstd"}},
		{name: "flat-deflate.qcow2", args: []string{"--compress", "deflate", "--cluster-size", "64K"}},
		{name: "flat.raw", args: []string{"-O", "raw"}},
	} {
		dst := filepath.Join(dir, tc.name)
		if strings.HasSuffix(dst, ".qcow2") {
			testutil.CheckOnCleanup(t, dst)
		}
		diskMust(t, append(append([]string{"disk", "convert"}, tc.args...), top, dst)...)
		if !testutil.QemuCompare(t, dst, shadow) {
			t.Errorf("convert %v: %s differs from the shadow file", tc.args, tc.name)
		}
		if _, _, err := diskExec(t, "disk", "compare", dst, top); err != nil {
			t.Errorf("cvd disk compare %s top: %v", tc.name, err)
		}
	}
	qi = testutil.Run(t, "qemu-img", "info", "--output=json", filepath.Join(dir, "flat-zstd.qcow2"))
	if !strings.Contains(qi, `"compression-type": "zstd"`) {
		t.Errorf("flat-zstd.qcow2 is not zstd for qemu-img:\n%s", qi)
	}
}

// TestDiskCheckExitCodes: clean 0, leaks 3 (and --repair fixes them), corruption 2.
func TestDiskCheckExitCodes(t *testing.T) {
	testutil.NeedQemu(t)
	dir := t.TempDir()
	img := filepath.Join(dir, "a.qcow2")
	testutil.Run(t, "qemu-img", "create", "-q", "-f", "qcow2", img, "1M")
	testutil.Run(t, "qemu-io", "-c", "write -P 7 0 64K", "-c", "write -P 8 128K 64K", img)
	if _, _, err := diskExec(t, "disk", "check", img); err != nil {
		t.Fatalf("clean image: %v", err)
	}

	leaky := filepath.Join(dir, "leaky.qcow2")
	diskCopyFile(t, img, leaky)
	diskPatchL2(t, leaky, 0, 0) // drop the reference to the first data cluster
	out, _, err := diskExec(t, "disk", "check", "--json", leaky)
	if code := exitCode(err); code != exitLeaks {
		t.Fatalf("leaked image: exit %d (%v), want 3\n%s", code, err, out)
	}
	var r struct {
		Leaks int `json:"leaks"`
	}
	if err := json.Unmarshal([]byte(out), &r); err != nil || r.Leaks != 1 {
		t.Fatalf("leaks = %d (%v), want 1\n%s", r.Leaks, err, out)
	}
	out, _, err = diskExec(t, "disk", "check", "--repair", leaky)
	if err != nil {
		t.Fatalf("check --repair: %v\n%s", err, out)
	}
	testutil.QemuCheck(t, leaky)

	corrupt := filepath.Join(dir, "corrupt.qcow2")
	diskCopyFile(t, img, corrupt)
	diskPatchL2(t, corrupt, 0, 1<<63|1<<30) // point a data cluster past the end of the file
	out, _, err = diskExec(t, "disk", "check", corrupt)
	if code := exitCode(err); code != 2 {
		t.Fatalf("corrupt image: exit %d (%v), want 2\n%s", code, err, out)
	}
	if !strings.Contains(out, "errors were found") {
		t.Errorf("corrupt image output:\n%s", out)
	}
}

// TestDiskUnsupportedFormat: a vmdk is named, not read as raw.
func TestDiskUnsupportedFormat(t *testing.T) {
	testutil.NeedQemu(t)
	dir := t.TempDir()
	for _, f := range []string{"vmdk", "vhdx", "vdi"} {
		t.Run(f, func(t *testing.T) {
			img := filepath.Join(dir, "a."+f)
			testutil.Run(t, "qemu-img", "create", "-q", "-f", f, img, "1M")
			for _, args := range [][]string{{"info", img}, {"map", img}, {"read", img, "0", "1"}, {"convert", img, img + ".qcow2"}, {"create", "-b", img, img + ".top"}} {
				_, _, err := diskExec(t, append([]string{"disk"}, args...)...)
				if err == nil || !strings.Contains(err.Error(), f) || !strings.Contains(err.Error(), "qemu-img convert") {
					t.Errorf("cvd disk %s: %v; want an error naming %s and the way out", args[0], err, f)
				}
			}
		})
	}
}

// TestDiskAllowRoot: a backing file in a sibling directory needs --allow-root.
func TestDiskAllowRoot(t *testing.T) {
	testutil.NeedQemu(t)
	dir := t.TempDir()
	lower, upper := filepath.Join(dir, "lower"), filepath.Join(dir, "upper")
	for _, d := range []string{lower, upper} {
		if err := os.Mkdir(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	base := filepath.Join(lower, "base.qcow2")
	top := filepath.Join(upper, "top.qcow2")
	testutil.Run(t, "qemu-img", "create", "-q", "-f", "qcow2", base, "1M")
	testutil.Run(t, "qemu-img", "create", "-q", "-f", "qcow2", "-b", "../lower/base.qcow2", "-F", "qcow2", top)
	_, _, err := diskExec(t, "disk", "info", "--chain", top)
	if err == nil || !strings.Contains(err.Error(), "--allow-root") {
		t.Fatalf("without --allow-root: %v; want a refusal that names --allow-root", err)
	}
	out, _, err := diskExec(t, "disk", "--allow-root", dir, "info", "--chain", top)
	if err != nil || !strings.Contains(out, "base.qcow2") {
		t.Fatalf("with --allow-root: %v\n%s", err, out)
	}
	if _, _, err := diskExec(t, "disk", "read", "--allow-root", lower, "--allow-root", upper, top, "0", "512"); err != nil {
		t.Fatalf("read with two --allow-root: %v", err)
	}
}

// TestDiskCreateOnRaw: -b with a raw backing file, SIZE defaulting to its size.
func TestDiskCreateOnRaw(t *testing.T) {
	testutil.NeedQemu(t)
	dir := t.TempDir()
	raw := filepath.Join(dir, "base.raw")
	testutil.Run(t, "qemu-img", "create", "-q", "-f", "raw", raw, "3M")
	testutil.Run(t, "qemu-io", "-f", "raw", "-c", "write -P 0x5a 1M 1M", raw)
	top := filepath.Join(dir, "top.qcow2")
	testutil.CheckOnCleanup(t, top)
	out, _, err := diskExec(t, "disk", "--json", "create", "-b", raw, top)
	if err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	var info diskLayerJSON
	if err := json.Unmarshal([]byte(out), &info); err != nil {
		t.Fatal(err)
	}
	if info.VirtualSize != 3<<20 || info.BackingFormat != "raw" || info.BackingFilename != "base.raw" {
		t.Fatalf("create on raw: %+v", info)
	}
	testutil.Run(t, "qemu-io", "-c", "read -P 0x5a 1M 1M", "-c", "read -P 0 0 1M", top)
	diskMust(t, "disk", "zero", top, "1M", "512K")
	testutil.Run(t, "qemu-io", "-c", "read -P 0 1M 512K", "-c", "read -P 0x5a 1536K 512K", top)
}

// diskExec runs the root command with args and returns stdout, stderr and the error.
func diskExec(t *testing.T, args ...string) (string, string, error) {
	t.Helper()
	root := newRootCommand()
	var out, errb bytes.Buffer
	root.SetArgs(args)
	root.SetOut(&out)
	root.SetErr(&errb)
	root.SetIn(strings.NewReader(""))
	err := root.ExecuteContext(context.Background())
	return out.String(), errb.String(), err
}

// diskMust is diskExec that fails the test on an error.
func diskMust(t *testing.T, args ...string) string {
	t.Helper()
	out, errOut, err := diskExec(t, args...)
	if err != nil {
		t.Fatalf("cvd %s: %v\n%s%s", strings.Join(args, " "), err, out, errOut)
	}
	return out
}

func diskItoa(n int64) string { return strconv.FormatInt(n, 10) }

// diskSameJSON compares two JSON documents by value.
func diskSameJSON(t *testing.T, what, got, want string) {
	t.Helper()
	var g, w any
	if err := json.Unmarshal([]byte(got), &g); err != nil {
		t.Fatalf("%s: cvd JSON: %v\n%s", what, err, got)
	}
	if err := json.Unmarshal([]byte(want), &w); err != nil {
		t.Fatalf("%s: qemu JSON: %v\n%s", what, err, want)
	}
	gb, _ := json.Marshal(g)
	wb, _ := json.Marshal(w)
	if !bytes.Equal(gb, wb) {
		t.Errorf("%s: cvd and qemu-img disagree\ncvd:  %s\nqemu: %s", what, gb, wb)
	}
}

func diskCopyFile(t *testing.T, from, to string) {
	t.Helper()
	b, err := os.ReadFile(from)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(to, b, 0o644); err != nil {
		t.Fatal(err)
	}
}

// diskPatchL2 overwrites the L2 entry of guest cluster idx (first L2 table) of a
// qcow2 image with v, reading the tables by hand so the test does not depend on
// the engine it checks.
func diskPatchL2(t *testing.T, path string, idx int, v uint64) {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	be := binary.BigEndian
	l1 := be.Uint64(b[40:48])
	l2 := be.Uint64(b[l1:]) & 0x00fffffffffffe00
	if l2 == 0 {
		t.Fatal("no L2 table")
	}
	be.PutUint64(b[l2+uint64(idx)*8:], v)
	if err := os.WriteFile(path, b, 0o644); err != nil {
		t.Fatal(err)
	}
}

// TestDiskMapJSONMatchesQemu: `cvd disk map --json` prints what
// `qemu-img map --output=json` prints, key for key, on chains QEMU made.
func TestDiskMapJSONMatchesQemu(t *testing.T) {
	testutil.NeedQemu(t)
	type layer struct {
		opts string   // qemu-img create -o
		size string   // "" : the chain's
		cmds []string // qemu-io commands
		conv string   // when set, the layer is qemu-img convert -c -o conv of a scratch image
	}
	writes := []string{"write -P 1 0 100K", "write -P 2 300K 64K", "write -z 1M 192K", "write -P 3 1500K 1", "discard 2M 128K", "write -P 4 3M 640K"}
	tests := []struct {
		name   string
		size   string
		layers []layer
	}{
		{name: "v3 alone", size: "4M", layers: []layer{{opts: "cluster_size=65536", cmds: writes}}},
		{name: "v2 alone", size: "4M", layers: []layer{{opts: "compat=0.10,cluster_size=4096", cmds: writes}}},
		{name: "512B chain", size: "4M", layers: []layer{{opts: "cluster_size=512", cmds: writes[:3]}, {opts: "cluster_size=512", cmds: writes[3:]}}},
		{name: "zstd compressed under overlay", size: "4M", layers: []layer{{conv: "compression_type=zstd", cmds: writes}, {opts: "cluster_size=65536", cmds: []string{"write -P 9 64K 64K", "write -z 3M 64K"}}}},
		{name: "shorter backing", size: "8M", layers: []layer{{size: "3800K", cmds: writes}, {size: "5M", opts: "cluster_size=4096", cmds: []string{"write -P 5 4M 4K"}}, {cmds: []string{"write -P 6 7M 1"}}}},
		{name: "over 4 GiB", size: "6G", layers: []layer{{cmds: []string{"write -P 1 4G 64K", "write -P 2 5G 1M"}}, {opts: "cluster_size=2097152", cmds: []string{"write -P 3 4100M 3M", "write -z 5G 2M"}}}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			var prev string
			for i, l := range tc.layers {
				p := filepath.Join(dir, fmt.Sprintf("l%d.qcow2", i))
				size := tc.size
				if l.size != "" {
					size = l.size
				}
				if l.conv != "" {
					src := p + ".src"
					testutil.Run(t, "qemu-img", "create", "-q", "-f", "qcow2", src, size)
					diskQemuIO(t, src, l.cmds)
					testutil.Run(t, "qemu-img", "convert", "-c", "-O", "qcow2", "-o", l.conv, src, p)
					if prev != "" {
						testutil.Run(t, "qemu-img", "rebase", "-u", "-b", filepath.Base(prev), "-F", "qcow2", p)
					}
				} else {
					args := []string{"create", "-q", "-f", "qcow2"}
					if l.opts != "" {
						args = append(args, "-o", l.opts)
					}
					if prev != "" {
						args = append(args, "-b", filepath.Base(prev), "-F", "qcow2")
					}
					testutil.Run(t, "qemu-img", append(args, p, size)...)
					diskQemuIO(t, p, l.cmds)
				}
				prev = p
			}
			got := diskMust(t, "disk", "map", "--json", prev)
			want := testutil.Run(t, "qemu-img", "map", "--output=json", prev)
			diskSameJSON(t, "chain map", got, want)
		})
	}
}

func diskQemuIO(t *testing.T, path string, cmds []string) {
	t.Helper()
	args := []string{}
	for _, c := range cmds {
		args = append(args, "-c", c)
	}
	testutil.Run(t, "qemu-io", append(args, path)...)
}

// TestDiskConvertProgress: the progress bar goes where it is asked to (a
// terminal, in real use) and nowhere in a pipe.
func TestDiskConvertProgress(t *testing.T) {
	dir := t.TempDir()
	src := filepath.Join(dir, "src.qcow2")
	diskMust(t, "disk", "create", src, "64M")
	data := filepath.Join(dir, "data")
	if err := os.WriteFile(data, bytes.Repeat([]byte("cvd"), 3<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	diskMust(t, "disk", "write", src, "0", data)

	var bar bytes.Buffer
	opts := &diskConvertOptions{format: "qcow2", progress: &bar}
	var out bytes.Buffer
	if err := runDiskConvert(context.Background(), opts, []string{src, filepath.Join(dir, "a.qcow2")}, &out); err != nil {
		t.Fatal(err)
	}
	if bar.Len() == 0 || !strings.Contains(out.String(), "converted") {
		t.Errorf("progress %q, output %q", bar.String(), out.String())
	}
	// Through the command with stderr not a terminal: nothing on stderr.
	_, errOut, err := diskExec(t, "disk", "convert", src, filepath.Join(dir, "b.qcow2"))
	if err != nil || errOut != "" {
		t.Errorf("convert in a pipe: %v, stderr %q", err, errOut)
	}
}

// TestDiskReadRangeParallel: the read-ahead workers deliver the chunks in
// order at any alignment, and stop when the output fails.
func TestDiskReadRangeParallel(t *testing.T) {
	dir := t.TempDir()
	img := filepath.Join(dir, "a.qcow2")
	diskMust(t, "disk", "create", "--cluster-size", "4K", img, "13M")
	data := make([]byte, 13<<20-777)
	rng := rand.New(rand.NewPCG(7, 7))
	for i := range data {
		data[i] = byte(rng.IntN(256))
	}
	src := filepath.Join(dir, "data")
	if err := os.WriteFile(src, data, 0o644); err != nil {
		t.Fatal(err)
	}
	diskMust(t, "disk", "write", img, "777", src)
	for _, r := range [][2]int64{{0, 13 << 20}, {777, int64(len(data))}, {1 << 20, 1}, {5<<20 + 3, 6<<20 + 5}} {
		got, _, err := diskExec(t, "disk", "read", img, diskItoa(r[0]), diskItoa(r[1]))
		if err != nil {
			t.Fatal(err)
		}
		want := append(make([]byte, 777), data...)[r[0] : r[0]+r[1]]
		if !bytes.Equal([]byte(got), want) {
			t.Fatalf("read %v differs", r)
		}
	}
	err := runDiskRead(context.Background(), &diskReadOptions{}, []string{img, "0", "13M"}, diskFailingWriter{})
	if err == nil || !strings.Contains(err.Error(), "disk full") {
		t.Fatalf("read into a failing writer: %v", err)
	}
}

type diskFailingWriter struct{}

func (w diskFailingWriter) Write(p []byte) (int, error) {
	return 0, errors.New("disk full")
}
