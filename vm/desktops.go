package vm

import (
	"context"
	"errors"
	"log/slog"
	"os"
	"sync"
	"time"

	"github.com/cvd-project/cvd/hypervisor"
)

// envURI is the connection setting's environment: $CVD_CONNECT, else
// $LIBVIRT_DEFAULT_URI, else "".
func envURI() string {
	for _, e := range []string{"CVD_CONNECT", "LIBVIRT_DEFAULT_URI"} {
		if v := os.Getenv(e); v != "" {
			return v
		}
	}
	return ""
}

// URI is the libvirt URI of a command whose --connect is flag: the flag, else
// the environment's, else the system libvirtd.
func URI(flag string) string {
	if flag != "" {
		return flag
	}
	if u := envURI(); u != "" {
		return u
	}
	return hypervisor.DefaultURI
}

// HookURI is the connection of the sync commands' VM hooks (serve, checkout,
// checkin, agent, the expiry purge): as URI, but "" (the hooks do nothing) for
// "none", or when nothing is set and no system libvirtd socket is there.
func HookURI(flag string) string {
	switch {
	case flag == "none":
		return ""
	case flag != "":
		return flag
	case envURI() != "":
		return envURI()
	}
	if _, err := os.Stat(hypervisor.DefaultSocket); err == nil {
		return hypervisor.DefaultURI
	}
	return ""
}

// Desktops stops and defines desktops' local VMs through package hypervisor (the
// hooks package syncd calls), on one connection to URI opened at first use. The domain of a desktop carries the desktop's
// name. Without a reachable libvirtd every hook does nothing.
type Desktops struct {
	URI string
	Log *slog.Logger

	mu   sync.Mutex
	conn *hypervisor.Conn
}

// connect returns the connection, or nil when libvirtd is unavailable.
func (v *Desktops) connect(ctx context.Context) (*hypervisor.Conn, error) {
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.conn != nil {
		return v.conn, nil
	}
	conn, err := hypervisor.Connect(ctx, v.URI)
	if err != nil {
		if errors.Is(err, hypervisor.ErrUnavailable) {
			v.Log.Warn("libvirtd unavailable: VM hooks skipped", "uri", v.URI, "err", err)
			return nil, nil
		}
		return nil, err
	}
	v.conn = conn
	return conn, nil
}

// Close closes the connection.
func (v *Desktops) Close() error {
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.conn == nil {
		return nil
	}
	err := v.conn.Close()
	v.conn = nil
	return err
}

// DefineDesktop defines (or redefines, keeping its UUID) the desktop's domain over
// its local tops, declaring every layer of both chains. No libvirtd: nothing to do.
func (v *Desktops) DefineDesktop(ctx context.Context, desktop, systemTop, userTop string) error {
	conn, err := v.connect(ctx)
	if conn == nil || err != nil {
		return err
	}
	spec, err := DesktopSpec(desktop, systemTop, userTop)
	if err != nil {
		return err
	}
	if info, err := conn.Info(ctx, desktop); err == nil {
		spec.UUID = info.UUID
	}
	return conn.Define(ctx, spec)
}

// UndefineDesktop removes the desktop's domain (stopping it first).
func (v *Desktops) UndefineDesktop(ctx context.Context, desktop string) error {
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
func (v *Desktops) Running(ctx context.Context, desktop string) bool {
	conn, err := v.connect(ctx)
	if conn == nil || err != nil {
		return false
	}
	st, err := conn.State(ctx, desktop)
	return err == nil && st == hypervisor.StateRunning
}

// StopDesktop shuts the desktop's domain down; no libvirtd or no domain means
// nothing runs.
func (v *Desktops) StopDesktop(ctx context.Context, desktop string, timeout time.Duration) (bool, error) {
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
		v.Log.Info("stopped server-side VM", "desktop", desktop, "forced", res.Forced, "took", res.Elapsed)
	}
	return !res.AlreadyOff, nil
}
