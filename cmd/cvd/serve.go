package main

import (
	"cmp"
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"time"

	"github.com/cvd-project/cvd/syncd/laptop"

	"github.com/spf13/cobra"

	"github.com/cvd-project/cvd/desktop"
	"github.com/cvd-project/cvd/syncd"
	"github.com/cvd-project/cvd/vm"
)

type serveOptions struct {
	listen          string
	tlsCert, tlsKey string
	connect         string
	leaseTTL        time.Duration
	maxLeaseTTL     time.Duration
	streamLeaseTTL  time.Duration
	stopTimeout     time.Duration
	maxConns        int
	progressTimeout time.Duration
	minRole         time.Duration
	insecure        bool
	encryptCopies   bool
	masterKey       string
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
reachable libvirtd this step is skipped.

HTTPS is the default off loopback: without --tls-cert, an address other than
127.0.0.0/8, ::1 or localhost is refused unless --insecure is given.`,
		Example: `  cvd serve --store /srv/cvd --listen 127.0.0.1:8470
  cvd serve --listen :8471 --tls-cert server.crt --tls-key server.key --encrypt-copies
  cvd serve --listen 10.0.0.5:8470 --insecure   # plain HTTP on a trusted network`,
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
	f.DurationVar(&opts.streamLeaseTTL, "stream-lease-ttl", time.Hour, "longest lease of a copy still streaming in (not fit for offline use until pinned and complete)")
	f.DurationVar(&opts.stopTimeout, "stop-timeout", time.Minute, "graceful VM shutdown time before a forced stop")
	f.IntVar(&opts.maxConns, "max-conns", 4096, "connections open at once (more wait in the kernel's backlog)")
	f.DurationVar(&opts.progressTimeout, "progress-timeout", time.Minute, "end a request whose body or stream moves no byte for this long")
	f.BoolVar(&opts.insecure, "insecure", false, "serve plain HTTP on an address other than loopback (tokens and desktops in clear on the network)")
	f.BoolVar(&opts.encryptCopies, "encrypt-copies", false, "give every check-out an encrypted copy (a device may ask with cvd checkout --encrypt in any case)")
	f.StringVar(&opts.masterKey, "master-key", "", "file of the key sealing escrowed copy keys (default <store>/sync/master.key, made on first use; every server of a site needs the same)")
	f.DurationVar(&opts.minRole, "min-role-interval", 30*time.Second, "how long a device stays active before another may ask for the role (negative: no minimum)")
	return c
}

func runServe(ctx context.Context, g *globalOptions, opts *serveOptions, out, errOut io.Writer, logLevelSet bool) error {
	if (opts.tlsCert == "") != (opts.tlsKey == "") {
		return &exitError{code: exitUsage, err: fmt.Errorf("give both --tls-cert and --tls-key")}
	}
	// The key pair is loaded before anything else: a server that cannot serve
	// TLS never announces an address.
	var tlsConf *tls.Config
	if opts.tlsCert != "" {
		cert, err := tls.LoadX509KeyPair(opts.tlsCert, opts.tlsKey)
		if err != nil {
			return &exitError{code: exitUsage, err: fmt.Errorf("TLS key pair: %w", err)}
		}
		tlsConf = &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}
	}
	if opts.tlsCert == "" && !opts.insecure && !loopback(opts.listen) {
		return &exitError{code: exitUsage, err: fmt.Errorf("--listen %s without --tls-cert: tokens and desktops would cross the network in clear; give --tls-cert and --tls-key, or --insecure", opts.listen)}
	}
	if opts.maxConns < 1 {
		return &exitError{code: exitUsage, err: fmt.Errorf("--max-conns %d: want at least 1", opts.maxConns)}
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
	so := syncd.ServerOptions{LeaseTTL: opts.leaseTTL, MaxLeaseTTL: opts.maxLeaseTTL, StreamLeaseTTL: opts.streamLeaseTTL, StopTimeout: opts.stopTimeout, Logger: log,
		MaxConns: opts.maxConns, ProgressTimeout: opts.progressTimeout, MinRoleInterval: cmp.Or(opts.minRole, -1),
		EncryptCopies: opts.encryptCopies, MasterKeyFile: opts.masterKey,
		BeforeCheckout: func(ctx context.Context, name string) error {
			p, err := desktop.ApplySwitch(ctx, st, name)
			if p != nil {
				log.Info("recompose marked on the desktop carried out before its check-out", "desktop", name, "action", p.Action, "version", p.NewVersion)
			}
			return err
		}}
	if uri := vm.HookURI(opts.connect); uri != "" {
		vms := &vm.Desktops{URI: uri, Log: log}
		defer vms.Close()
		so.VM = vms
	}
	srv, err := syncd.NewServer(st, so)
	if err != nil {
		return err
	}
	defer srv.Close()
	ln, err := srv.Listen(opts.listen)
	if err != nil {
		return err
	}
	scheme := "http"
	if tlsConf != nil {
		scheme = "https"
	}
	hs := srv.HTTPServer(slog.NewLogLogger(log.Handler(), slog.LevelWarn))
	hs.TLSConfig = tlsConf
	fmt.Fprintf(out, "cvd serve: store %s on %s://%s\n", st.Dir(), scheme, ln.Addr())
	if f, ok := out.(*os.File); ok {
		f.Sync()
	}
	errc := make(chan error, 1)
	go func() {
		if tlsConf != nil {
			errc <- hs.ServeTLS(ln, "", "")
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

// The sync hooks on a desktop's local VM are package vm's.
var (
	_ syncd.VMStopper = (*vm.Desktops)(nil)
	_ laptop.LocalVM  = (*vm.Desktops)(nil)
)

// loopback reports whether a listen address (HOST:PORT) is on the loopback
// interface only.
func loopback(addr string) bool {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return false
	}
	if host == "localhost" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}
