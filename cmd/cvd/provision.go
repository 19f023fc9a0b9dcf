package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"time"

	"github.com/spf13/cobra"

	"github.com/cvd-project/cvd/clone"
	"github.com/cvd-project/cvd/hypervisor"
	"github.com/cvd-project/cvd/images"
	"github.com/cvd-project/cvd/syncd/laptop"
	"github.com/cvd-project/cvd/vm"
)

type provisionOptions struct {
	name     string
	count    int
	start    int
	connect  string
	noStart  bool
	parallel int
	boot     bootFlags
	pull     serverFlags
}

func newProvisionCommand(g *globalOptions) *cobra.Command {
	opts := &provisionOptions{}
	c := &cobra.Command{
		Use:   "provision DESKTOP --count N [--name PREFIX]",
		Short: "Clone a desktop N times, define each clone under libvirt and start it",
		Long: `Provision in one step: make N linked clones of the desktop (tops and identity
seeds, as cvd clone), define each as a libvirt domain declaring its whole chain
(as cvd vm start), and start them, several at a time. Clones are named
PREFIX-1 ... PREFIX-N (PREFIX defaults to the desktop's name; a single clone is
named PREFIX). It reports each clone and the time from the command's start to
all of them running (libvirt's "running": QEMU started, the guest booting), with
the clones per second, and where the time went: connect, clone, define, start.

With --server, this is a hypervisor host of a site: the desktop's sealed layers
that the host's store lacks are pulled from the server first (see cvd pull); a
second provision of the same desktop moves no layer bytes.

libvirtd is reached first, so nothing is cloned when it is down. When defining
or starting some clone fails, the others still run, cvd names the failures
and exits 1; the clones stay in the store (cvd vm rm --clone removes them).

` + connectHelp + `

` + bootHelp,
		Example: `  cvd provision alice --count 50
  cvd provision kiosk --count 3 --name kiosk-test --memory 128 \
      --kernel .cache/guest/kernel --initrd .cache/guest/initramfs.cpio.gz \
      --append "$(cat .cache/guest/cmdline) cvd.pattern=0xa7"
  cvd provision alice --count 10 --no-start --json
  cvd provision alice --count 20 --server https://cvd.example:8470 --token "$HOST_TOKEN"`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			opts.boot.noteChanged(cmd)
			return runProvision(cmd.Context(), g, opts, args, cmd.OutOrStdout())
		},
	}
	f := c.Flags()
	f.StringVar(&opts.name, "name", "", "clone name prefix (default: the desktop's name)")
	f.IntVar(&opts.count, "count", 1, "number of clones")
	f.IntVar(&opts.start, "start", 1, "first clone number")
	f.StringVar(&opts.connect, "connect", vm.URI(""), "libvirt URI (env CVD_CONNECT, LIBVIRT_DEFAULT_URI)")
	f.BoolVar(&opts.noStart, "no-start", false, "define the domains without starting them")
	f.IntVar(&opts.parallel, "parallel", 4, "domains defined and started at once")
	addBootFlags(c, &opts.boot)
	opts.pull.add(c, "pull the desktop's layers from this server of the site first (a host's store; see cvd pull)")
	return c
}

// provisionedClone is one clone in cvd provision's report.
type provisionedClone struct {
	Name      string  `json:"name"`
	UUID      string  `json:"uuid"`
	MAC       string  `json:"mac"`
	Hostname  string  `json:"hostname"`
	Disk      string  `json:"disk"`
	Seed      string  `json:"seed,omitempty"`
	State     string  `json:"state"`
	Reason    string  `json:"reason,omitempty"`
	RunningAt float64 `json:"running_at_s,omitempty"` // seconds from the command's start
	Error     string  `json:"error,omitempty"`
}

// provisionTiming says where provision's time went, in seconds from its start.
type provisionTiming struct {
	Connect float64 `json:"connect_s"` // reaching libvirtd
	Clone   float64 `json:"clone_s"`   // tops and seeds written and recorded
	Define  float64 `json:"define_s"`  // sum over clones of the define calls
	Start   float64 `json:"start_s"`   // sum over clones of the start calls
	// Total is from the start to the last clone running (or defined, with
	// --no-start).
	Total        float64 `json:"total_s"`
	ClonesPerSec float64 `json:"clones_per_s"`
}

type provisionReport struct {
	Desktop string `json:"desktop"`
	URI     string `json:"uri"`
	Count   int    `json:"count"`
	// Parallel is how many domains were defined and started at once.
	Parallel int                `json:"parallel"`
	Started  bool               `json:"started"`
	Clones   []provisionedClone `json:"clones"`
	Timing   provisionTiming    `json:"timing"`
	Failed   int                `json:"failed"`
	// Pull is what --server fetched before cloning.
	Pull *laptop.CheckoutReport `json:"pull,omitempty"`
}

func runProvision(ctx context.Context, g *globalOptions, opts *provisionOptions, args []string, out io.Writer) error {
	t0 := time.Now()
	since := func() float64 { return time.Since(t0).Seconds() }
	desktop := args[0]
	if opts.count < 1 {
		return &exitError{code: exitUsage, err: errors.New("--count must be at least 1")}
	}
	if opts.parallel < 1 {
		return &exitError{code: exitUsage, err: errors.New("--parallel must be at least 1")}
	}
	if opts.name == "" {
		opts.name = desktop
	}
	var boot *images.Boot
	if opts.boot.changed {
		b, err := opts.boot.apply(nil)
		if err != nil {
			return err
		}
		boot = b
	}
	rep := provisionReport{Desktop: desktop, URI: opts.connect, Count: opts.count, Parallel: opts.parallel, Started: !opts.noStart}

	conn, err := connectLibvirt(ctx, opts.connect)
	if err != nil {
		return err
	}
	defer conn.Close()
	rep.Timing.Connect = since()

	if opts.pull.server != "" {
		if rep.Pull, err = opts.pull.pull(ctx, g, desktop, io.Discard); err != nil {
			return err
		}
	}
	// Clones and their specs; the store is closed before libvirt's part so that
	// other cvd commands are not kept waiting.
	st, err := openStore(g, false)
	if err != nil {
		return err
	}
	if _, err := st.Desktop(desktop); err != nil {
		st.Close()
		return vmError(fmt.Errorf("%w (cvd provision clones desktops; cvd desktop ls lists them)", err), opts.connect, "")
	}
	cs, err := clone.Create(ctx, st, desktop, clone.Options{Name: opts.name, Count: opts.count, Start: opts.start, Boot: boot})
	if err != nil {
		st.Close()
		return storeError(err)
	}
	specs := make([]hypervisor.DomainSpec, len(cs))
	for i := range cs {
		if specs[i], err = vm.CloneSpec(st, &cs[i]); err != nil {
			st.Close()
			return err
		}
	}
	st.Close()
	rep.Timing.Clone = since() - rep.Timing.Connect
	if err := os.MkdirAll(filepath.Join(g.store, vm.LogsDir), 0o755); err != nil {
		return err
	}

	outs, timing := vm.Provision(ctx, conn, specs, vm.ProvisionOptions{Parallel: opts.parallel, NoStart: opts.noStart})
	rep.Clones = make([]provisionedClone, len(cs))
	for i, c := range cs {
		o := outs[i]
		pc := &rep.Clones[i]
		*pc = provisionedClone{Name: c.Name, UUID: c.UUID, MAC: c.MAC, Hostname: c.Hostname, Disk: specs[i].Disks[0].Chain[0].Path,
			Seed: specs[i].SeedISO, State: o.State, Reason: o.Reason}
		if o.Err != nil {
			pc.Error = vmError(o.Err, opts.connect, c.Name).Error()
		} else {
			pc.RunningAt = rep.Timing.Clone + rep.Timing.Connect + o.RunningAt.Seconds()
		}
	}
	define, startDur := timing.Define, timing.Start
	rep.Timing.Define, rep.Timing.Start = define.Seconds(), startDur.Seconds()
	for _, pc := range rep.Clones {
		if pc.Error != "" {
			rep.Failed++
		}
		rep.Timing.Total = max(rep.Timing.Total, pc.RunningAt)
	}
	if rep.Timing.Total > 0 {
		rep.Timing.ClonesPerSec = float64(len(cs)-rep.Failed) / rep.Timing.Total
	}

	if g.json {
		if err := printJSON(out, rep); err != nil {
			return err
		}
	} else {
		printProvision(out, &rep)
	}
	if rep.Failed > 0 {
		return &exitError{code: exitFailure, err: fmt.Errorf("%d of %d clones did not %s (see above); the clones stay in the store: cvd vm rm --clone NAME removes one",
			rep.Failed, len(cs), map[bool]string{true: "start", false: "get defined"}[!opts.noStart])}
	}
	return nil
}

func printProvision(out io.Writer, rep *provisionReport) {
	if rep.Pull != nil {
		printPull(out, rep.Pull)
	}
	tw := newTable(out)
	at := "RUNNING AT"
	if !rep.Started {
		at = "DEFINED AT"
	}
	fmt.Fprintf(tw, "NAME\tSTATE\t%s\tMAC\tUUID\tTOP\n", at)
	show := len(rep.Clones) <= 20
	for _, c := range rep.Clones {
		if c.Error != "" {
			fmt.Fprintf(tw, "%s\tFAILED\t-\t%s\t%s\t%s\n", c.Name, c.MAC, c.UUID, c.Error)
			continue
		}
		if show {
			fmt.Fprintf(tw, "%s\t%s\t%.2fs\t%s\t%s\t%s\n", c.Name, c.State, c.RunningAt, c.MAC, c.UUID, c.Disk)
		}
	}
	if !show {
		fmt.Fprintf(tw, "(%d clones, %d listed: failures only; --json lists all)\n", len(rep.Clones), rep.Failed)
	}
	tw.Flush()
	t := rep.Timing
	what := "running"
	if !rep.Started {
		what = "defined"
	}
	fmt.Fprintf(out, "%d of %d clones of %s %s on %s in %.2fs (%.1f clones/s): connect %.2fs, clone %.2fs (tops and seeds), define %.2fs, start %.2fs (define and start: sums over clones, %d at a time)\n",
		rep.Count-rep.Failed, rep.Count, rep.Desktop, what, rep.URI, t.Total, t.ClonesPerSec, t.Connect, t.Clone, t.Define, t.Start, rep.Parallel)
}
