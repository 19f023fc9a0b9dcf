package main

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"strings"
	"time"

	"github.com/cvd-project/cvd/syncd/laptop"

	"github.com/schollz/progressbar/v3"
	"github.com/spf13/cobra"
	"golang.org/x/term"

	"github.com/cvd-project/cvd/images"
	"github.com/cvd-project/cvd/syncd/proto"
	"github.com/cvd-project/cvd/vm"
)

type checkoutOptions struct {
	server  string
	token   string
	caCert  string
	ttl     time.Duration
	bwlimit string
	stream  bool
	cache   string
	pin     bool
	timeout time.Duration
	encrypt bool
}

func newCheckoutCommand(g *globalOptions) *cobra.Command {
	opts := &checkoutOptions{}
	c := &cobra.Command{
		Use:   "checkout DESKTOP --server URL --token T",
		Short: "Check a desktop out of a server into the local store, for offline use",
		Long: `Check a desktop out: the server gives this device the desktop's lease (another
device's lease refuses it, naming the holder), stops the server-side VM and
seals its changes; the laptop fetches only the layers its store lacks, as
compressed, digest-checked cluster streams, and sets the desktop up over fresh
writable tops. An interrupted check-out resumes where it stopped when run again.

Past the lease's expiry the local copy is purged, even offline: keep ` + "`cvd agent`" + `
running to renew it, or check in before then.

With --stream the command returns as soon as the desktop can start: it fetches
only the layers' entry lists, makes the writable tops over NBD exports of the
read-only chains, and starts this store's stream process (cvd stream serve),
which serves the guest's reads, fetching what is missing first, and fills the
rest in the background: the working set other devices read at boot first.
With --cache-size the local copy never exceeds the budget; cvd pin fetches
everything before going offline. Once every layer has arrived the desktop
switches to its local files at its next start, and checks in as usual.

With --encrypt (or a server run with --encrypt-copies) every layer and top the
laptop writes is a LUKS-encrypted qcow2 (aes-256-xts, QEMU's own format) under a
key the server makes and escrows; the laptop keeps it wrapped and bound to the
lease, and shreds it with the files' key slots at the lease's expiry (offline
too) or when the administrator wipes the device (cvd device wipe).

Over https the server's certificate key is pinned at the first check-out: a
later check-in, renewal or check-out refuses a server showing another key.`,
		Example: `  cvd checkout alice --server https://cvd.example:8470 --token "$TOKEN" --store ~/cvd
  CVD_TOKEN=... cvd checkout alice --server http://127.0.0.1:8470 --json
  cvd checkout alice --server http://127.0.0.1:8470 --stream --cache-size 256M
  cvd checkout alice --server https://cvd.example:8470 --ca-cert ca.pem --encrypt`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return runCheckout(cmd.Context(), g, opts, args[0], cmd.OutOrStdout(), cmd.ErrOrStderr())
		},
	}
	f := c.Flags()
	f.StringVar(&opts.server, "server", os.Getenv("CVD_SERVER"), "server URL, http(s)://HOST:PORT (env CVD_SERVER)")
	f.StringVar(&opts.token, "token", "", "device token from `cvd device add` (env CVD_TOKEN)")
	f.StringVar(&opts.caCert, "ca-cert", "", "PEM file of a CA to trust for an https server")
	f.DurationVar(&opts.ttl, "ttl", 0, "lease length to ask for (0: the server's default)")
	f.StringVar(&opts.bwlimit, "bwlimit", "", "cap the bytes per second moved, e.g. 20M (default: no cap)")
	f.BoolVar(&opts.stream, "stream", false, "return as soon as the desktop can start: its layers stream in behind it (see cvd stream)")
	f.StringVar(&opts.cache, "cache-size", "", "with --stream: keep at most SIZE of the read-only layers here, e.g. 256M (least recently read go first)")
	f.BoolVar(&opts.pin, "pin", false, "with --stream: fetch everything in the background (for offline use)")
	f.BoolVar(&opts.encrypt, "encrypt", false, "encrypt the local copy (LUKS qcow2, its key tied to the lease: shredded at expiry or on a wipe)")
	f.DurationVar(&opts.timeout, "read-timeout", 0, "with --stream: how long a guest read waits for a missing cluster before it fails (default 20s)")
	return c
}

func runCheckout(ctx context.Context, g *globalOptions, opts *checkoutOptions, desktop string, out, errOut io.Writer) error {
	if opts.token == "" {
		opts.token = os.Getenv("CVD_TOKEN")
	}
	if opts.server == "" || opts.token == "" {
		return &exitError{code: exitUsage, err: fmt.Errorf("give --server and --token (or CVD_SERVER and CVD_TOKEN)")}
	}
	lp, done, err := openLaptop(g, errOut)
	if err != nil {
		return err
	}
	defer done()
	limit, err := parseRate(opts.bwlimit)
	if err != nil {
		return err
	}
	co := laptop.ClientOptions{CACert: opts.caCert, RateLimit: limit}
	if prev, err := lp.Checkout(desktop); err == nil && prev.Pin != "" {
		co.Pin = prev.Pin // the key seen at the first check-out
	}
	c, err := laptop.NewClient(opts.server, opts.token, co)
	if err != nil {
		return &exitError{code: exitUsage, err: err}
	}
	if opts.encrypt && opts.stream {
		return &exitError{code: exitUsage, err: fmt.Errorf("--encrypt and --stream: an encrypted copy is checked out whole")}
	}
	if opts.stream {
		return runStreamCheckout(ctx, g, lp, c, opts, desktop, out)
	}
	if opts.cache != "" || opts.pin || opts.timeout != 0 {
		return &exitError{code: exitUsage, err: fmt.Errorf("--cache-size, --pin and --read-timeout go with --stream")}
	}
	rep, err := lp.CheckOut(ctx, c, desktop, laptop.CheckoutOptions{TTL: opts.ttl, CACert: opts.caCert, Encrypt: opts.encrypt})
	if err != nil {
		return storeError(err)
	}
	if g.json {
		return printJSON(out, rep)
	}
	fmt.Fprintf(out, "checked out %s version %d from %s\n", rep.Desktop, rep.Version, rep.Server)
	fmt.Fprintf(out, "  lease %s until %s\n", rep.Lease.ID, rep.Lease.Expires.Local().Format(time.RFC3339))
	fmt.Fprintf(out, "  layers fetched %d, already held %d; received %s (%d bytes) carrying %s of clusters in %.2fs\n",
		len(rep.LayersFetched), len(rep.LayersHeld), fmtBytes(rep.Bytes), rep.Bytes, fmtBytes(rep.DataBytes), rep.Took)
	if rep.ClustersByRef > 0 {
		fmt.Fprintf(out, "  %d clusters came as references to layers this store held already\n", rep.ClustersByRef)
	}
	if rep.Sealed > 0 {
		fmt.Fprintf(out, "  the server sealed its changes as version %d first\n", rep.Sealed)
	}
	return nil
}

// runStreamCheckout checks the desktop out to stream and starts its stream
// process.
func runStreamCheckout(ctx context.Context, g *globalOptions, lp *laptop.Laptop, c *laptop.Client, opts *checkoutOptions, desktop string, out io.Writer) error {
	var cache int64
	if opts.cache != "" {
		var err error
		if cache, err = parseSize(opts.cache); err != nil || cache <= 0 {
			return &exitError{code: exitUsage, err: fmt.Errorf("--cache-size %q: want a size such as 256M", opts.cache)}
		}
	}
	rep, err := lp.CheckOutStream(ctx, c, desktop, laptop.StreamOptions{TTL: opts.ttl, CACert: opts.caCert, CacheSize: cache, Pin: opts.pin, ReadTimeout: opts.timeout})
	if err != nil {
		return storeError(err)
	}
	pid, err := startStream(ctx, g, lp, desktop)
	if err != nil {
		return err
	}
	if g.json {
		return printJSON(out, struct {
			*laptop.StreamReport
			PID int `json:"stream_pid"`
		}{rep, pid})
	}
	fmt.Fprintf(out, "checked out %s version %d from %s to stream: %s of layers behind it (%d layers; %d here already)\n",
		rep.Desktop, rep.Version, rep.Server, fmtBytes(rep.TotalBytes), len(rep.LayersStream), len(rep.LayersLocal))
	fmt.Fprintf(out, "  lease %s until %s\n", rep.Lease.ID, rep.Lease.Expires.Local().Format(time.RFC3339))
	fmt.Fprintf(out, "  ready in %.2fs (entry lists: %s); stream process %d\n", rep.Took, fmtBytes(rep.EntryBytes), pid)
	for _, dn := range proto.DiskNames {
		if u := rep.Exports[dn]; u != "" {
			fmt.Fprintf(out, "  %s: %s\n", dn, u)
		}
	}
	return nil
}

// openLaptop opens the local store for a sync command (openStore purges expired
// copies first).
func openLaptop(g *globalOptions, errOut io.Writer) (*laptop.Laptop, func(), error) {
	st, err := openStore(g, false)
	if err != nil {
		return nil, nil, err
	}
	lo := laptop.LaptopOptions{Progress: newProgress(errOut), Logger: slog.Default(), VNCListen: os.Getenv("CVD_VNC_LISTEN")}
	vms := &vm.Desktops{URI: vm.HookURI(""), Log: slog.Default()}
	if vms.URI != "" {
		lo.VM = vms
	}
	lp, err := laptop.OpenLaptop(st, lo)
	if err != nil {
		st.Close()
		return nil, nil, err
	}
	return lp, func() { lp.Close(); st.Close(); vms.Close() }, nil
}

// barProgress draws transfers on a terminal; in a pipe it draws nothing.
type barProgress struct {
	w   io.Writer
	bar *progressbar.ProgressBar
}

func newProgress(w io.Writer) laptop.Progress {
	f, ok := w.(*os.File)
	if !ok || !term.IsTerminal(int(f.Fd())) {
		return nil
	}
	return &barProgress{w: w}
}

func (p *barProgress) Start(what string, total int64) {
	p.bar = progressbar.NewOptions64(total,
		progressbar.OptionSetWriter(p.w),
		progressbar.OptionSetDescription(what),
		progressbar.OptionShowBytes(true),
		progressbar.OptionSetWidth(30),
		progressbar.OptionThrottle(100*time.Millisecond),
		progressbar.OptionClearOnFinish(),
	)
}

func (p *barProgress) Add(n int64) {
	if p.bar != nil {
		p.bar.Add64(n)
	}
}

func (p *barProgress) Done() {
	if p.bar != nil {
		p.bar.Finish()
		p.bar = nil
	}
}

// newStatusCommand is `cvd status`: the desktops checked out to this store.
func newStatusCommand(g *globalOptions) *cobra.Command {
	return &cobra.Command{
		Use:   "status [DESKTOP]",
		Short: "Show the desktops on this store: role, lease, version, staged update, pending check-in",
		Example: `  cvd status
  cvd status alice --json`,
		Args: cobra.MaximumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			lp, done, err := openLaptop(g, cmd.ErrOrStderr())
			if err != nil {
				return err
			}
			defer done()
			cos, err := lp.Checkouts()
			if err != nil {
				return err
			}
			var sel []statusLine
			for _, co := range cos {
				if len(args) == 1 && co.Desktop != args[0] {
					continue
				}
				s := statusOf(co)
				if s.Unsent, err = lp.Unsent(co.Desktop); err != nil {
					return err
				}
				if co.Stream != nil {
					s.Stream = streamStatusOf(lp, co)
				}
				sel = append(sel, s)
			}
			if len(args) == 1 && len(sel) == 0 {
				return fmt.Errorf("desktop %s: %w", args[0], proto.ErrNotCheckedOut)
			}
			out := cmd.OutOrStdout()
			if g.json {
				if sel == nil {
					sel = []statusLine{}
				}
				return printJSON(out, sel)
			}
			tw := newTable(out)
			fmt.Fprintln(tw, "DESKTOP\tROLE\tVERSION\tSERVER\tLEASE EXPIRES\tSYSTEM\tUSER\tNOT CHECKED IN\tSTAGED\tPENDING")
			for _, s := range sel {
				var n, b int64
				for _, u := range s.Unsent {
					n, b = n+u.Clusters, b+u.Bytes
				}
				unsent := "nothing"
				if n > 0 {
					unsent = fmt.Sprintf("%d clusters (%s)", n, fmtBytes(b))
				}
				expires, staged := "-", "-"
				if !s.Expires.IsZero() {
					expires = s.Expires.Local().Format(time.RFC3339)
				}
				if s.Staged != 0 {
					staged = fmt.Sprintf("update staged: version %d, applies at next start", s.Staged)
				}
				fmt.Fprintf(tw, "%s\t%s\t%d\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", s.Desktop, s.Role, s.Version, s.Server,
					expires, images.ShortID(s.Layers[proto.DiskSystem]),
					images.ShortID(s.Layers[proto.DiskUser]), unsent, staged, s.Pending)
			}
			if err := tw.Flush(); err != nil {
				return err
			}
			for _, s := range sel {
				if st := s.Stream; st != nil {
					fmt.Fprintf(out, "%s streams: %s of %s local (%.1f %%)", s.Desktop, fmtBytes(st.LocalBytes), fmtBytes(st.TotalBytes),
						100*float64(st.LocalBytes)/float64(max(st.TotalBytes, 1)))
					switch {
					case st.Complete:
						fmt.Fprint(out, "; complete: switches to local files at its next start")
					case st.Running:
						fmt.Fprintf(out, "; stream process %d", st.PID)
					default:
						fmt.Fprint(out, "; no stream process (cvd stream serve, or cvd agent, starts it)")
					}
					fmt.Fprintln(out)
					for _, dn := range proto.DiskNames {
						if d, ok := st.Disks[dn]; ok && d.NBD != "" {
							fmt.Fprintf(out, "  %s: %s (%s of %s local)\n", dn, d.NBD, fmtBytes(d.LocalBytes), fmtBytes(d.TotalBytes))
						}
					}
				}
			}
			return nil
		},
	}
}

// streamStatusOf is a streamed desktop's state: as its stream process last
// wrote it, or from the record alone when none ever ran.
func streamStatusOf(lp *laptop.Laptop, co laptop.Checkout) *laptop.StreamStatus {
	if st, err := lp.StreamState(co.Desktop); err == nil {
		return st
	}
	st := &laptop.StreamStatus{Disks: map[string]laptop.StreamDiskStatus{}}
	for dn, sd := range co.Stream.Disks {
		ds := laptop.StreamDiskStatus{Top: sd.Top}
		if len(sd.Layers) > 0 {
			ds.NBD = co.Stream.NBDURI(dn)
		}
		st.Disks[dn] = ds
	}
	return st
}

// statusLine is a checked-out desktop as status shows it (no token).
type statusLine struct {
	Desktop     string            `json:"desktop"`
	Server      string            `json:"server"`
	Version     int               `json:"version"`
	Lease       string            `json:"lease"`
	Expires     time.Time         `json:"expires"`
	Layers      map[string]string `json:"layers"`
	CheckedOut  time.Time         `json:"checked_out"`
	LastCheckin time.Time         `json:"last_checkin,omitzero"`
	Pending     string            `json:"pending,omitempty"`
	Offline     bool              `json:"offline,omitempty"`
	// Role is active (this device holds the lease), inactive (it follows the
	// desktop's group) or offline (a bundle's copy); Policy says which layers
	// it holds; Staged is the version staged for the next start (0: none).
	Role   string `json:"role"`
	Policy string `json:"policy,omitempty"`
	Staged int    `json:"staged,omitempty"`
	// Unsent is, per disk, what the local tops hold that no check-in took.
	Unsent map[string]laptop.Unsent `json:"unsent"`
	// Stream is a streamed desktop's state: per disk the NBD URI of its
	// read-only chain and the bytes local and total.
	Stream *laptop.StreamStatus `json:"stream,omitempty"`
}

func statusOf(co laptop.Checkout) statusLine {
	s := statusLine{Desktop: co.Desktop, Server: co.Server, Version: co.Version, Lease: co.Lease.ID, Expires: co.Lease.Expires,
		Layers: co.Layers, CheckedOut: co.CheckedOut, LastCheckin: co.LastCheckin, Offline: co.Offline, Role: "active", Policy: co.Policy}
	switch {
	case co.Offline:
		s.Role = "offline"
	case co.Follow:
		s.Role = "inactive"
	}
	if co.Staged != nil {
		s.Staged = co.Staged.Version
	}
	if co.Pending != nil {
		s.Pending = "check-in " + co.Pending.ID[:12]
		if co.Pending.Result != nil {
			s.Pending += fmt.Sprintf(" (committed as version %d, not frozen yet)", co.Pending.Result.Version)
		}
	}
	if s.Server == "" {
		s.Server = strings.Repeat("-", 1)
	}
	return s
}
