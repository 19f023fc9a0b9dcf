package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/cvd-project/cvd/clone"
	"github.com/cvd-project/cvd/hypervisor"
	"github.com/cvd-project/cvd/images"
	"github.com/cvd-project/cvd/vm"
)

// connectTimeout bounds reaching libvirtd (the first connection to a fresh
// libvirtd takes about 1.6 s here while it probes QEMU's capabilities).
const connectTimeout = 30 * time.Second

const connectHelp = `Connection (--connect, else $CVD_CONNECT, else $LIBVIRT_DEFAULT_URI, else
qemu:///system):
  qemu:///system                    the system libvirtd
  qemu:///system?socket=PATH        a libvirtd listening on PATH (scripts/libvirtd.sh
                                    start DIR starts a private one and prints PATH)
  test:///default[?socket=PATH]     libvirt's test driver (no guest runs)`

const bootHelp = `Boot: a clone boots from its system disk (BIOS) unless it has a kernel:
--kernel, --initrd and --append boot a kernel directly (the tiny test guest that
scripts/build-guest.sh builds). What a clone boots with (kernel, initrd, command
line, memory, vCPUs) is recorded in its catalog entry by cvd provision or by the
flags of cvd vm start, and reused by every later start; --disk-boot goes back to
booting from the disk. Disks: vda is the system disk, vdb the user disk when the
desktop has one, and the seed image (cidata) the next one (vdb, or vdc).`

// connectLibvirt connects to uri, with errors a user can act on.
func connectLibvirt(ctx context.Context, uri string) (*hypervisor.Conn, error) {
	cctx, cancel := context.WithTimeout(ctx, connectTimeout)
	defer cancel()
	c, err := hypervisor.Connect(cctx, uri)
	if err != nil {
		return nil, vmError(err, uri, "")
	}
	return c, nil
}

// vmError turns a hypervisor error into one that says what to do, with an exit
// code: a bad URI is a usage error, the rest are failures.
func vmError(err error, uri, name string) error {
	if err == nil {
		return nil
	}
	var ee *exitError
	if errors.As(err, &ee) {
		return err
	}
	switch {
	case errors.Is(err, hypervisor.ErrBadURI):
		return &exitError{code: exitUsage, err: fmt.Errorf("--connect: %w (supported: qemu:///system, qemu:///system?socket=PATH, test:///default)", err)}
	case errors.Is(err, hypervisor.ErrUnavailable):
		return &exitError{code: exitFailure, err: fmt.Errorf("%w; --connect or CVD_CONNECT names the libvirtd to use (now %s)", err, uri)}
	case errors.Is(err, hypervisor.ErrNotFound) && name != "":
		return &exitError{code: exitFailure, err: &annotated{
			msg: fmt.Sprintf("no domain named %q on %s (cvd vm ls lists cvd's domains; cvd vm start %s defines a clone's)", name, uri, name), err: err}}
	case errors.Is(err, images.ErrNotFound):
		return &exitError{code: exitFailure, err: err}
	}
	return err
}

// annotated is an error with a message of its own that still unwraps to the
// error it explains.
type annotated struct {
	msg string
	err error
}

func (a *annotated) Error() string { return a.msg }
func (a *annotated) Unwrap() error { return a.err }

type vmOptions struct {
	connect string
}

func newVMCommand(g *globalOptions) *cobra.Command {
	opts := &vmOptions{}
	c := &cobra.Command{
		Use:   "vm",
		Short: "Run clones under libvirt: start, stop, status, ls, rm, checkpoint, wait",
		Long: `Run clones as libvirt domains. A domain is named after its clone and declares
the clone's whole chain in its XML: the writable top, any frozen checkpoints,
and every sealed layer down to the base, each with its format, so libvirt never
probes a format or follows a backing name. It carries the clone's UUID and MAC,
its cloud-init seed image (read-only), and cvd's metadata (desktop and clone),
which marks it as cvd's: cvd vm ls lists only those, and cvd vm rm touches no
other domain. A domain type of kvm is used only where the host can really run
KVM guests, else qemu (TCG). Each domain's serial console goes to
STORE/logs/NAME.serial.log.

` + connectHelp + `

` + bootHelp,
		Example: `  cvd vm start alice-vm-01
  cvd vm start kiosk-1 --kernel /boot/vmlinux --initrd initrd.gz --append 'console=ttyS0'
  cvd vm status alice-vm-01 --json
  cvd vm checkpoint alice-vm-01
  cvd vm stop alice-vm-01 --timeout 1m
  cvd vm ls
  cvd vm rm alice-vm-01 --clone`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error { return cmd.Help() },
	}
	c.PersistentFlags().StringVar(&opts.connect, "connect", vm.URI(""), "libvirt URI (env CVD_CONNECT, LIBVIRT_DEFAULT_URI)")
	c.AddCommand(newVMStartCommand(g, opts), newVMStopCommand(g, opts), newVMStatusCommand(g, opts),
		newVMLsCommand(g, opts), newVMRmCommand(g, opts), newVMCheckpointCommand(g, opts), newVMWaitCommand(g, opts))
	return c
}

// bootFlags are the flags that say how a clone boots.
type bootFlags struct {
	kernel, initrd, append string
	memory, vcpus          uint
	diskBoot               bool
	changed                bool // any of them was given
}

func addBootFlags(c *cobra.Command, b *bootFlags) {
	f := c.Flags()
	f.StringVar(&b.kernel, "kernel", "", "boot this kernel directly (absolute path recorded) instead of the disk")
	f.StringVar(&b.initrd, "initrd", "", "initramfs for --kernel")
	f.StringVar(&b.append, "append", "", "kernel command line for --kernel")
	f.UintVar(&b.memory, "memory", 0, fmt.Sprintf("memory in MiB (default %d)", hypervisor.DefaultMemoryMiB))
	f.UintVar(&b.vcpus, "vcpus", 0, fmt.Sprintf("virtual CPUs (default %d)", hypervisor.DefaultVCPUs))
	f.BoolVar(&b.diskBoot, "disk-boot", false, "boot from the system disk (forget a recorded kernel)")
}

// noteChanged records whether any boot flag was given.
func (b *bootFlags) noteChanged(c *cobra.Command) {
	for _, n := range []string{"kernel", "initrd", "append", "memory", "vcpus", "disk-boot"} {
		if c.Flags().Changed(n) {
			b.changed = true
		}
	}
}

// apply returns old (a clone's recorded boot, or nil) with the given flags laid
// over it.
func (b *bootFlags) apply(old *images.Boot) (*images.Boot, error) {
	nb := images.Boot{}
	if old != nil {
		nb = *old
	}
	if b.diskBoot {
		if b.kernel != "" {
			return nil, &exitError{code: exitUsage, err: errors.New("--disk-boot and --kernel exclude each other")}
		}
		nb.Kernel, nb.Initrd, nb.Cmdline = "", "", ""
	}
	if b.kernel != "" {
		k, err := filepath.Abs(b.kernel)
		if err != nil {
			return nil, err
		}
		nb.Kernel, nb.Initrd, nb.Cmdline = k, "", ""
	}
	if b.initrd != "" {
		p, err := filepath.Abs(b.initrd)
		if err != nil {
			return nil, err
		}
		nb.Initrd = p
	}
	if b.append != "" {
		nb.Cmdline = b.append
	}
	if nb.Kernel == "" && (nb.Initrd != "" || nb.Cmdline != "") {
		return nil, &exitError{code: exitUsage, err: errors.New("--initrd and --append need --kernel")}
	}
	for _, f := range []string{nb.Kernel, nb.Initrd} {
		if f == "" {
			continue
		}
		if st, err := os.Stat(f); err != nil || !st.Mode().IsRegular() {
			return nil, &exitError{code: exitUsage, err: fmt.Errorf("boot file %s: not a readable file", f)}
		}
	}
	if b.memory != 0 {
		nb.MemoryMiB = b.memory
	}
	if b.vcpus != 0 {
		nb.VCPUs = b.vcpus
	}
	if nb == (images.Boot{}) {
		return nil, nil
	}
	return &nb, nil
}

// ---- start ----------------------------------------------------------------------

type vmStartOptions struct {
	boot       bootFlags
	defineOnly bool
}

type vmStartResult struct {
	Name      string    `json:"name"`
	URI       string    `json:"uri"`
	UUID      string    `json:"uuid"`
	MAC       string    `json:"mac"`
	Desktop   string    `json:"desktop,omitempty"`
	Disks     []vm.Disk `json:"disks"`
	Seed      string    `json:"seed,omitempty"`
	Kernel    string    `json:"kernel,omitempty"`
	SerialLog string    `json:"serial_log"`
	State     string    `json:"state"`
	Reason    string    `json:"reason"`
	Seconds   float64   `json:"seconds"`
}

func newVMStartCommand(g *globalOptions, vo *vmOptions) *cobra.Command {
	opts := &vmStartOptions{}
	c := &cobra.Command{
		Use:   "start CLONE",
		Short: "Define a clone as a libvirt domain (from the catalog) and start it",
		Long: `Define the clone as a domain, from its catalog entry, and start it. The domain
is (re)defined at every start, so it always boots on the chain the catalog
records: after a live checkpoint, on the new top over the frozen ones. A domain
that is running is left alone (an error).

` + bootHelp,
		Example: `  cvd vm start alice-vm-01
  cvd vm start test-1 --kernel .cache/guest/kernel --initrd .cache/guest/initramfs.cpio.gz \
      --append 'console=ttyS0 cvd.hold=60' --memory 128
  cvd vm start alice-vm-01 --disk-boot --memory 4096 --vcpus 2`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			opts.boot.noteChanged(cmd)
			return runVMStart(cmd.Context(), g, vo, opts, args, cmd.OutOrStdout())
		},
	}
	addBootFlags(c, &opts.boot)
	c.Flags().BoolVar(&opts.defineOnly, "define-only", false, "define (or redefine) the domain without starting it")
	return c
}

func runVMStart(ctx context.Context, g *globalOptions, vo *vmOptions, opts *vmStartOptions, args []string, out io.Writer) error {
	name := args[0]
	st, err := openStore(g, !opts.boot.changed)
	if err != nil {
		return err
	}
	spec, c, err := func() (hypervisor.DomainSpec, *images.Clone, error) {
		defer st.Close()
		c, err := st.Clone(name)
		if err != nil {
			return hypervisor.DomainSpec{}, nil, vmError(fmt.Errorf("%w (cvd clone ls lists the clones of store %s)", err, st.Dir()), vo.connect, "")
		}
		if opts.boot.changed {
			b, err := opts.boot.apply(c.Boot)
			if err != nil {
				return hypervisor.DomainSpec{}, nil, err
			}
			if err := st.SetCloneBoot(b, name); err != nil {
				return hypervisor.DomainSpec{}, nil, err
			}
			c.Boot = b
		}
		spec, err := vm.CloneSpec(st, c)
		return spec, c, err
	}()
	if err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(spec.SerialLog), 0o755); err != nil {
		return err
	}
	start := time.Now()
	conn, err := connectLibvirt(ctx, vo.connect)
	if err != nil {
		return err
	}
	defer conn.Close()
	if s, err := conn.Status(ctx, name); err == nil && s.State.Active() {
		return &exitError{code: exitFailure, err: fmt.Errorf("domain %q is already %s on %s (cvd vm stop %s first to boot it on its catalog chain)", name, s, vo.connect, name)}
	} else if err != nil && !errors.Is(err, hypervisor.ErrNotFound) {
		return vmError(err, vo.connect, name)
	}
	vm.RelinkCheckpoints(spec, slog.Default())
	if err := conn.Define(ctx, spec); err != nil {
		if errors.Is(err, hypervisor.ErrExists) {
			return &exitError{code: exitFailure, err: fmt.Errorf("a domain named %q with another UUID exists on %s: it is not clone %s's (%w)", name, vo.connect, name, err)}
		}
		return vmError(err, vo.connect, name)
	}
	if !opts.defineOnly {
		if err := conn.Start(ctx, name); err != nil {
			return vmError(err, vo.connect, name)
		}
	}
	s, err := conn.Status(ctx, name)
	if err != nil {
		return vmError(err, vo.connect, name)
	}
	r := vmStartResult{Name: name, URI: vo.connect, UUID: c.UUID, MAC: c.MAC, Desktop: c.Desktop,
		Disks: vm.SpecDisks(spec), Seed: spec.SeedISO, Kernel: spec.Kernel, SerialLog: spec.SerialLog,
		State: s.State.String(), Reason: s.Reason, Seconds: time.Since(start).Seconds()}
	if g.json {
		return printJSON(out, r)
	}
	verb := "started"
	if opts.defineOnly {
		verb = "defined"
	}
	fmt.Fprintf(out, "%s %s on %s in %.2fs: %s\n", verb, name, vo.connect, r.Seconds, s)
	printVMDisks(out, r.Disks)
	if r.Seed != "" {
		fmt.Fprintf(out, "  seed  %s (raw, read-only)\n", r.Seed)
	}
	if r.Kernel != "" {
		fmt.Fprintf(out, "  boot  kernel %s\n", r.Kernel)
	}
	fmt.Fprintf(out, "  log   %s\n", r.SerialLog)
	return nil
}

func printVMDisks(out io.Writer, ds []vm.Disk) {
	for _, d := range ds {
		var parts []string
		for _, l := range d.Chain {
			parts = append(parts, fmt.Sprintf("%s (%s)", l.Path, l.Format))
		}
		ro := ""
		if d.ReadOnly {
			ro = " read-only"
		}
		fmt.Fprintf(out, "  %s%s  %s\n", d.Target, ro, strings.Join(parts, "\n         → "))
	}
}

// ---- stop -----------------------------------------------------------------------

type vmStopOptions struct {
	timeout time.Duration
}

type vmStopResult struct {
	Name       string  `json:"name"`
	Forced     bool    `json:"forced"`
	AlreadyOff bool    `json:"already_off"`
	State      string  `json:"state"`
	Reason     string  `json:"reason"`
	Seconds    float64 `json:"seconds"`
	Message    string  `json:"message"`
}

func newVMStopCommand(g *globalOptions, vo *vmOptions) *cobra.Command {
	opts := &vmStopOptions{}
	c := &cobra.Command{
		Use:   "stop DOMAIN",
		Short: "Shut a domain down: ACPI power button, then destroy after --timeout",
		Long: `Ask the guest to power off (an ACPI power button press) and wait up to
--timeout; a guest that is still running then is destroyed (forced off, as
pulling the plug: what it had not written is lost), and cvd says so. A domain
already shut off is not an error.`,
		Example: `  cvd vm stop alice-vm-01
  cvd vm stop kiosk-7 --timeout 5s`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return runVMStop(cmd.Context(), g, vo, opts, args, cmd.OutOrStdout())
		},
	}
	c.Flags().DurationVar(&opts.timeout, "timeout", 30*time.Second, "how long the guest gets to power off before it is destroyed")
	return c
}

func runVMStop(ctx context.Context, g *globalOptions, vo *vmOptions, opts *vmStopOptions, args []string, out io.Writer) error {
	if opts.timeout <= 0 {
		return &exitError{code: exitUsage, err: errors.New("--timeout must be positive")}
	}
	conn, err := connectLibvirt(ctx, vo.connect)
	if err != nil {
		return err
	}
	defer conn.Close()
	res, err := conn.Shutdown(ctx, args[0], opts.timeout)
	if err != nil {
		return vmError(err, vo.connect, args[0])
	}
	r := vmStopResult{Name: args[0], Forced: res.Forced, AlreadyOff: res.AlreadyOff, State: res.Status.State.String(),
		Reason: res.Status.Reason, Seconds: res.Elapsed.Seconds(), Message: res.Message}
	if g.json {
		return printJSON(out, r)
	}
	fmt.Fprintln(out, res.Message)
	return nil
}

// ---- status ---------------------------------------------------------------------

type vmStatus struct {
	Name    string    `json:"name"`
	UUID    string    `json:"uuid"`
	State   string    `json:"state"`
	Reason  string    `json:"reason"`
	Running bool      `json:"running"`
	Managed bool      `json:"managed"`
	Clone   string    `json:"clone,omitempty"`
	Desktop string    `json:"desktop,omitempty"`
	Disks   []vm.Disk `json:"disks,omitempty"`
}

func vmStatusOf(info hypervisor.DomainInfo) vmStatus {
	s := vmStatus{Name: info.Name, UUID: info.UUID, State: info.Status.State.String(), Reason: info.Status.Reason,
		Running: info.Status.State.Active(), Managed: info.Managed, Clone: info.Metadata.Clone, Desktop: info.Metadata.Desktop}
	for _, d := range info.Disks {
		vd := vm.Disk{Target: d.Target, ReadOnly: d.ReadOnly}
		for _, l := range d.Chain {
			vd.Chain = append(vd.Chain, vm.Layer{Path: l.Path, Format: l.Format})
		}
		s.Disks = append(s.Disks, vd)
	}
	return s
}

func newVMStatusCommand(g *globalOptions, vo *vmOptions) *cobra.Command {
	return &cobra.Command{
		Use:   "status DOMAIN",
		Short: "Show a domain's state and reason, its clone, desktop and disk chains",
		Long: `Show a domain's state (running, shut off, ...) and libvirt's reason for it
(booted; shutdown: the guest powered off; destroyed: forced off; crashed), the
clone and desktop it belongs to, and each disk's chain as libvirt declares it.
A domain that does not exist, a libvirtd that does not answer and a bad URI
are errors (exit 1, or 2 for the URI).`,
		Example: `  cvd vm status alice-vm-01
  cvd vm status alice-vm-01 --json`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return runVMStatus(cmd.Context(), g, vo, args, cmd.OutOrStdout())
		},
	}
}

func runVMStatus(ctx context.Context, g *globalOptions, vo *vmOptions, args []string, out io.Writer) error {
	conn, err := connectLibvirt(ctx, vo.connect)
	if err != nil {
		return err
	}
	defer conn.Close()
	info, err := conn.Info(ctx, args[0])
	if err != nil {
		return vmError(err, vo.connect, args[0])
	}
	s := vmStatusOf(info)
	if g.json {
		return printJSON(out, s)
	}
	tw := newTable(out)
	fmt.Fprintf(tw, "name\t%s\n", s.Name)
	fmt.Fprintf(tw, "uuid\t%s\n", s.UUID)
	fmt.Fprintf(tw, "state\t%s\n", s.State)
	fmt.Fprintf(tw, "reason\t%s\n", s.Reason)
	if s.Managed {
		fmt.Fprintf(tw, "clone\t%s\n", s.Clone)
		fmt.Fprintf(tw, "desktop\t%s\n", orDash(s.Desktop))
	} else {
		fmt.Fprintf(tw, "managed\tno (not a cvd domain)\n")
	}
	tw.Flush()
	printVMDisks(out, s.Disks)
	return nil
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

// ---- ls -------------------------------------------------------------------------

func newVMLsCommand(g *globalOptions, vo *vmOptions) *cobra.Command {
	return &cobra.Command{
		Use:     "ls",
		Aliases: []string{"list"},
		Short:   "List cvd's domains (running or not) with their clone and desktop",
		Example: `  cvd vm ls
  cvd vm ls --json`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			return runVMLs(cmd.Context(), g, vo, cmd.OutOrStdout())
		},
	}
}

func runVMLs(ctx context.Context, g *globalOptions, vo *vmOptions, out io.Writer) error {
	conn, err := connectLibvirt(ctx, vo.connect)
	if err != nil {
		return err
	}
	defer conn.Close()
	infos, err := conn.ListManaged(ctx)
	if err != nil {
		return vmError(err, vo.connect, "")
	}
	ss := []vmStatus{}
	for _, i := range infos {
		ss = append(ss, vmStatusOf(i))
	}
	if g.json {
		return printJSON(out, ss)
	}
	tw := newTable(out)
	fmt.Fprintln(tw, "NAME\tSTATE\tREASON\tCLONE\tDESKTOP\tTOP")
	for _, s := range ss {
		top := "-"
		if len(s.Disks) > 0 && len(s.Disks[0].Chain) > 0 {
			top = s.Disks[0].Chain[0].Path
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", s.Name, s.State, s.Reason, s.Clone, orDash(s.Desktop), top)
	}
	return tw.Flush()
}

// ---- rm -------------------------------------------------------------------------

type vmRmOptions struct {
	force, clone bool
}

func newVMRmCommand(g *globalOptions, vo *vmOptions) *cobra.Command {
	opts := &vmRmOptions{}
	c := &cobra.Command{
		Use:   "rm DOMAIN...",
		Short: "Undefine cvd's domains (disks untouched; --clone also removes the clone)",
		Long: `Undefine domains. Only cvd's domains (with cvd's metadata) are touched, and
never a layer: the clone's files stay unless --clone, which also removes the
clone from the store (its tops, frozen checkpoints and seed image; the sealed
layers stay). A running domain is refused unless --force, which destroys it
first (forced off). With --clone, a clone whose domain was never defined is
removed too.`,
		Example: `  cvd vm rm alice-vm-01
  cvd vm rm --force --clone kiosk-1 kiosk-2`,
		Args: cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return runVMRm(cmd.Context(), g, vo, opts, args, cmd.OutOrStdout())
		},
	}
	c.Flags().BoolVarP(&opts.force, "force", "f", false, "destroy a running domain first")
	c.Flags().BoolVar(&opts.clone, "clone", false, "also remove the clone and its files from the store")
	return c
}

type vmRmResult struct {
	Name         string `json:"name"`
	Destroyed    bool   `json:"destroyed,omitempty"`
	Undefined    bool   `json:"undefined"`
	CloneRemoved bool   `json:"clone_removed,omitempty"`
}

func runVMRm(ctx context.Context, g *globalOptions, vo *vmOptions, opts *vmRmOptions, args []string, out io.Writer) error {
	conn, err := connectLibvirt(ctx, vo.connect)
	if err != nil {
		return err
	}
	defer conn.Close()
	var res []vmRmResult
	var clones []string
	// Check everything first: nothing is undefined when one name is refused.
	infos := map[string]*hypervisor.DomainInfo{}
	for _, name := range args {
		info, err := conn.Info(ctx, name)
		switch {
		case errors.Is(err, hypervisor.ErrNotFound) && opts.clone:
			infos[name] = nil // no domain; the clone is still removed
		case err != nil:
			return vmError(err, vo.connect, name)
		case !info.Managed:
			return &exitError{code: exitFailure, err: fmt.Errorf("domain %q is not cvd's (no cvd metadata): not touching it", name)}
		case info.Status.State.Active() && !opts.force:
			return &exitError{code: exitFailure, err: fmt.Errorf("domain %q is %s: stop it first (cvd vm stop %s), or use --force to destroy it", name, info.Status, name)}
		default:
			infos[name] = &info
		}
	}
	for _, name := range args {
		r := vmRmResult{Name: name}
		if info := infos[name]; info != nil {
			if info.Status.State.Active() {
				if err := conn.Destroy(ctx, name); err != nil && !errors.Is(err, hypervisor.ErrNotRunning) {
					return vmError(err, vo.connect, name)
				}
				r.Destroyed = true
			}
			if err := conn.Undefine(ctx, name, 0); err != nil {
				return vmError(err, vo.connect, name)
			}
			r.Undefined = true
			os.Remove(filepath.Join(g.store, vm.LogsDir, name+".serial.log"))
		}
		if opts.clone {
			c := name
			if info := infos[name]; info != nil && info.Metadata.Clone != "" {
				c = info.Metadata.Clone
			}
			clones = append(clones, c)
		}
		res = append(res, r)
	}
	if len(clones) > 0 {
		st, err := openStore(g, false)
		if err != nil {
			return err
		}
		defer st.Close()
		gone, err := clone.Remove(st, clones...)
		if err != nil {
			return vmError(fmt.Errorf("domains undefined, but removing the clones failed: %w", err), vo.connect, "")
		}
		removed := map[string]bool{}
		for _, c := range gone {
			removed[c.Name] = true
		}
		for i := range res {
			res[i].CloneRemoved = removed[clones[i]]
		}
	}
	if g.json {
		return printJSON(out, res)
	}
	for _, r := range res {
		var did []string
		if r.Destroyed {
			did = append(did, "destroyed (forced off)")
		}
		if r.Undefined {
			did = append(did, "undefined")
		} else {
			did = append(did, "no domain")
		}
		if r.CloneRemoved {
			did = append(did, "clone and its files removed (layers untouched)")
		} else {
			did = append(did, "disk files kept")
		}
		fmt.Fprintf(out, "%s: %s\n", r.Name, strings.Join(did, ", "))
	}
	return nil
}

// ---- wait -----------------------------------------------------------------------

func newVMWaitCommand(g *globalOptions, vo *vmOptions) *cobra.Command {
	var timeout time.Duration
	c := &cobra.Command{
		Use:   "wait DOMAIN...",
		Short: "Wait until domains are shut off and print how each ended",
		Long: `Wait until every domain is shut off (polling its state; it never subscribes to
libvirt events) and print its final state and reason: shutdown (the guest
powered off), destroyed, crashed. Exit 1 when --timeout passes first.`,
		Example: `  cvd vm wait kiosk-1 kiosk-2 --timeout 2m`,
		Args:    cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return runVMWait(cmd.Context(), g, vo, timeout, args, cmd.OutOrStdout())
		},
	}
	c.Flags().DurationVar(&timeout, "timeout", 10*time.Minute, "give up after this long")
	return c
}

func runVMWait(ctx context.Context, g *globalOptions, vo *vmOptions, timeout time.Duration, args []string, out io.Writer) error {
	conn, err := connectLibvirt(ctx, vo.connect)
	if err != nil {
		return err
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	var res []vmStatus
	for _, name := range args {
		s, err := conn.Wait(ctx, name)
		if err != nil {
			if errors.Is(err, context.DeadlineExceeded) {
				return &exitError{code: exitFailure, err: fmt.Errorf("domain %q still %s after %s", name, s, timeout)}
			}
			return vmError(err, vo.connect, name)
		}
		res = append(res, vmStatus{Name: name, State: s.State.String(), Reason: s.Reason})
	}
	if g.json {
		return printJSON(out, res)
	}
	for _, r := range res {
		fmt.Fprintf(out, "%s: %s (%s)\n", r.Name, r.State, r.Reason)
	}
	return nil
}

// ---- checkpoint -----------------------------------------------------------------

type vmCheckpointResult struct {
	Name  string              `json:"name"`
	Disks []vm.CheckpointDisk `json:"disks"`
}

func newVMCheckpointCommand(g *globalOptions, vo *vmOptions) *cobra.Command {
	return &cobra.Command{
		Use:   "checkpoint CLONE",
		Short: "Live checkpoint: freeze a running clone's top and send its writes to a new one",
		Long: `Take a live, disk-only external snapshot of a running clone: its current top
(and its user top, if it has one) is frozen as a read-only layer and the guest's
writes go to a new top over it, clones/NAME.cpN.qcow2 (NAME.user.cpN.qcow2),
atomically and without the guest noticing. The frozen file stays where it was,
in the store's clones directory, made read-only; the clone's catalog entry
records the new top and the list of frozen checkpoints, so cvd vm start always
declares the whole chain: new top → checkpoints, newest first → sealed layers.
Removing the clone removes its checkpoints; the sealed layers are never touched.`,
		Example: `  cvd vm checkpoint alice-vm-01
  cvd vm checkpoint alice-vm-01 --json`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return runVMCheckpoint(cmd.Context(), g, vo, args, cmd.OutOrStdout())
		},
	}
}

func runVMCheckpoint(ctx context.Context, g *globalOptions, vo *vmOptions, args []string, out io.Writer) error {
	name := args[0]
	conn, err := connectLibvirt(ctx, vo.connect)
	if err != nil {
		return err
	}
	defer conn.Close()
	st, err := openStore(g, false)
	if err != nil {
		return err
	}
	defer st.Close()
	disks, err := vm.Checkpoint(ctx, st, conn, name, slog.Default())
	switch {
	case errors.Is(err, vm.ErrNotRunning), errors.Is(err, vm.ErrForeignTop):
		return &exitError{code: exitFailure, err: err}
	case errors.Is(err, images.ErrNotFound):
		return vmError(err, vo.connect, "")
	case err != nil:
		return vmError(err, vo.connect, name)
	}
	r := vmCheckpointResult{Name: name, Disks: disks}
	if g.json {
		return printJSON(out, r)
	}
	for _, d := range r.Disks {
		fmt.Fprintf(out, "%s %s: checkpoint %d\n  frozen  %s (read-only now, kept in the store's clones directory)\n  new top %s (the guest writes here)\n",
			name, d.Target, d.N, d.Frozen, d.Top)
	}
	return nil
}
