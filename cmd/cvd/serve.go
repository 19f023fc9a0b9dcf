package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/cvd-project/cvd/desktop"
	"github.com/cvd-project/cvd/disk"
	"github.com/cvd-project/cvd/hypervisor"
	"github.com/cvd-project/cvd/syncd"
	"github.com/spf13/cobra"
)

type serveOptions struct {
	listen          string
	tlsCert, tlsKey string
	connect         string
	leaseTTL        time.Duration
	maxLeaseTTL     time.Duration
	stopTimeout     time.Duration
}

func newServeCommand(g *globalOptions) *cobra.Command {
	opts := &serveOptions{}
	c := &cobra.Command{
		Use:   "serve --listen ADDR",
		Short: "Serve the store to laptops: check-out, check-in, leases (HTTP API under /v1)",
		Long: `Serve the store's desktops to laptops over HTTP(S). Devices are registered
with ` + "`cvd device add`" + ` and authenticate with their token; every call checks it.
Prometheus metrics are at /metrics. See README.md, "Sync API".

Every other command works on the store while it serves (the store's catalog is
shared by every process): devices added or removed, rollbacks and recomposes
take effect at the server's next request.

A desktop's server-side VM (the libvirt domain named after the desktop) is shut
down before a check-out: gracefully, then forced after --stop-timeout. Without a
reachable libvirtd this step is skipped.`,
		Example: `  cvd serve --store /srv/cvd --listen 127.0.0.1:8470
  cvd serve --listen :8471 --tls-cert server.crt --tls-key server.key`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			return runServe(cmd.Context(), g, opts, cmd.OutOrStdout(), cmd.ErrOrStderr(), cmd.Flags().Changed("log-level"))
		},
	}
	f := c.Flags()
	f.StringVar(&opts.listen, "listen", "127.0.0.1:8470", "address to listen on (HOST:PORT; port 0 picks one)")
	f.StringVar(&opts.tlsCert, "tls-cert", "", "PEM certificate: serve HTTPS")
	f.StringVar(&opts.tlsKey, "tls-key", "", "PEM private key of --tls-cert")
	f.StringVar(&opts.connect, "connect", "", `libvirt URI for stopping server-side VMs (default: $CVD_CONNECT, else $LIBVIRT_DEFAULT_URI, else qemu:///system when its socket exists; "none" = never)`)
	f.DurationVar(&opts.leaseTTL, "lease-ttl", 7*24*time.Hour, "lease length when a device asks for none")
	f.DurationVar(&opts.maxLeaseTTL, "max-lease-ttl", 30*24*time.Hour, "longest lease a device may ask for")
	f.DurationVar(&opts.stopTimeout, "stop-timeout", time.Minute, "graceful VM shutdown time before a forced stop")
	return c
}

func runServe(ctx context.Context, g *globalOptions, opts *serveOptions, out, errOut io.Writer, logLevelSet bool) error {
	if (opts.tlsCert == "") != (opts.tlsKey == "") {
		return &exitError{code: exitUsage, err: fmt.Errorf("give both --tls-cert and --tls-key")}
	}
	log := slog.Default()
	if !logLevelSet {
		log = slog.New(slog.NewTextHandler(errOut, &slog.HandlerOptions{Level: slog.LevelInfo}))
	}
	// The server's own catalog writes finish after a SIGTERM: only the wait for
	// the listener follows the command's context.
	gs := *g
	gs.ctx = context.Background()
	st, err := openStore(&gs, false)
	if err != nil {
		return err
	}
	defer st.Close()
	so := syncd.ServerOptions{LeaseTTL: opts.leaseTTL, MaxLeaseTTL: opts.maxLeaseTTL, StopTimeout: opts.stopTimeout, Logger: log,
		BeforeCheckout: func(ctx context.Context, name string) error {
			p, err := desktop.ApplySwitch(ctx, st, name)
			if p != nil {
				log.Info("recompose marked on the desktop carried out before its check-out", "desktop", name, "action", p.Action, "version", p.NewVersion)
			}
			return err
		}}
	if uri := libvirtURI(opts.connect); uri != "" {
		vms := &libvirtVMs{uri: uri, log: log}
		defer vms.Close()
		so.VM = vms
	}
	srv, err := syncd.NewServer(st, so)
	if err != nil {
		return err
	}
	defer srv.Close()
	ln, err := net.Listen("tcp", opts.listen)
	if err != nil {
		return err
	}
	scheme := "http"
	if opts.tlsCert != "" {
		scheme = "https"
	}
	hs := &http.Server{Handler: srv.Handler(), ReadHeaderTimeout: 30 * time.Second, ErrorLog: slog.NewLogLogger(log.Handler(), slog.LevelWarn)}
	fmt.Fprintf(out, "cvd serve: store %s on %s://%s\n", st.Dir(), scheme, ln.Addr())
	if f, ok := out.(*os.File); ok {
		f.Sync()
	}
	errc := make(chan error, 1)
	go func() {
		if opts.tlsCert != "" {
			errc <- hs.ServeTLS(ln, opts.tlsCert, opts.tlsKey)
		} else {
			errc <- hs.Serve(ln)
		}
	}()
	select {
	case err := <-errc:
		return err
	case <-ctx.Done():
	}
	sctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := hs.Shutdown(sctx); err != nil {
		hs.Close()
	}
	log.Info("stopped")
	return nil
}

// libvirtURI picks the libvirt connection of the sync commands' VM hooks (serve,
// checkout, checkin, agent, the expiry purge), as the vm commands pick theirs:
// the flag, else $CVD_CONNECT, else $LIBVIRT_DEFAULT_URI, else the system
// libvirtd when its socket is there; "" (the hooks do nothing) otherwise or for
// "none". Whatever libvirt says, a top that QEMU holds open is never sealed
// (disk.InUse).
func libvirtURI(flag string) string {
	switch flag {
	case "none":
		return ""
	case "":
		for _, e := range []string{"CVD_CONNECT", "LIBVIRT_DEFAULT_URI"} {
			if v := os.Getenv(e); v != "" {
				return v
			}
		}
		if _, err := os.Stat(hypervisor.DefaultSocket); err == nil {
			return hypervisor.DefaultURI
		}
		return ""
	}
	return flag
}

// libvirtVMs stops and defines desktops' VMs through package hypervisor, on one
// connection opened at first use. The domain of a desktop carries the desktop's
// name. Without a reachable libvirtd every hook does nothing.
type libvirtVMs struct {
	uri string
	log *slog.Logger

	mu   sync.Mutex
	conn *hypervisor.Conn
}

// connect returns the connection, or nil when libvirtd is unavailable.
func (v *libvirtVMs) connect(ctx context.Context) (*hypervisor.Conn, error) {
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.conn != nil {
		return v.conn, nil
	}
	conn, err := hypervisor.Connect(ctx, v.uri)
	if err != nil {
		if errors.Is(err, hypervisor.ErrUnavailable) {
			v.log.Warn("libvirtd unavailable: VM hooks skipped", "uri", v.uri, "err", err)
			return nil, nil
		}
		return nil, err
	}
	v.conn = conn
	return conn, nil
}

// Close closes the connection.
func (v *libvirtVMs) Close() error {
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.conn == nil {
		return nil
	}
	err := v.conn.Close()
	v.conn = nil
	return err
}

var (
	_ syncd.VMStopper = (*libvirtVMs)(nil)
	_ syncd.LocalVM   = (*libvirtVMs)(nil)
)

// DefineDesktop defines (or redefines, keeping its UUID) the desktop's domain over
// its local tops, declaring every layer of both chains. No libvirtd: nothing to do.
func (v *libvirtVMs) DefineDesktop(ctx context.Context, desktop, systemTop, userTop string) error {
	conn, err := v.connect(ctx)
	if conn == nil || err != nil {
		return err
	}
	spec := hypervisor.DomainSpec{Name: desktop, Metadata: hypervisor.Metadata{Desktop: desktop, Clone: desktop}}
	if info, err := conn.Info(ctx, desktop); err == nil {
		spec.UUID = info.UUID
	}
	for i, top := range []string{systemTop, userTop} {
		if top == "" {
			continue
		}
		img, err := disk.Open(top, disk.OpenOptions{ReadOnly: true, AllowedRoots: []string{filepath.Dir(filepath.Dir(top))}})
		if err != nil {
			return err
		}
		var chain []disk.Info
		for _, l := range disk.Layers(img) {
			chain = append(chain, l.Info())
		}
		img.Close()
		spec.Disks = append(spec.Disks, hypervisor.DiskSpec{Chain: chain, Target: []string{"vda", "vdb"}[i]})
	}
	return conn.Define(ctx, spec)
}

// UndefineDesktop removes the desktop's domain (stopping it first).
func (v *libvirtVMs) UndefineDesktop(ctx context.Context, desktop string) error {
	conn, err := v.connect(ctx)
	if conn == nil || err != nil {
		return err
	}
	if _, err := conn.Shutdown(ctx, desktop, 30*time.Second); err != nil && !errors.Is(err, hypervisor.ErrNotFound) {
		return err
	}
	if err := conn.Undefine(ctx, desktop, 0); err != nil && !errors.Is(err, hypervisor.ErrNotFound) {
		return err
	}
	return nil
}

// Running reports whether the desktop's domain runs (false without libvirtd).
func (v *libvirtVMs) Running(ctx context.Context, desktop string) bool {
	conn, err := v.connect(ctx)
	if conn == nil || err != nil {
		return false
	}
	st, err := conn.State(ctx, desktop)
	return err == nil && st == hypervisor.StateRunning
}

// StopDesktop shuts the desktop's domain down; no libvirtd or no domain means
// nothing runs.
func (v *libvirtVMs) StopDesktop(ctx context.Context, desktop string, timeout time.Duration) (bool, error) {
	conn, err := v.connect(ctx)
	if conn == nil || err != nil {
		return false, err
	}
	res, err := conn.Shutdown(ctx, desktop, timeout)
	if errors.Is(err, hypervisor.ErrNotFound) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	if !res.AlreadyOff {
		v.log.Info("stopped server-side VM", "desktop", desktop, "forced", res.Forced, "took", res.Elapsed)
	}
	return !res.AlreadyOff, nil
}
