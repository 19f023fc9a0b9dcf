package vm

import (
	"context"
	"errors"
	"fmt"
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

// DesktopVM is what a device defines its VM of a desktop from: its local
// tops, the desktop's boot configuration (the files resolved on this device)
// and the device's own identity, which is never synced.
type DesktopVM struct {
	Name               string
	SystemTop, UserTop string // absolute paths; UserTop "" for none
	Kernel, Initrd     string // absolute paths; Kernel "" boots from the system disk
	Cmdline            string
	MemoryMiB, VCPUs   uint
	NIC                bool
	UUID, MAC          string
	SeedISO, SerialLog string
	// VNCListen gives the VM a VNC console on that address ("": none).
	VNCListen string
	// ApplyBoot says the desktop's boot configuration changed since this
	// device last defined the VM from it: a VM defined already takes it.
	// Otherwise only the VM's disks follow the tops and every other setting
	// (its user's edits too) stays.
	ApplyBoot bool
}

// DefineDesktop defines the desktop's domain over its local tops, declaring
// every layer of both chains (see DesktopVM for what an existing domain
// keeps). No libvirtd: nothing to do.
func (v *Desktops) DefineDesktop(ctx context.Context, d DesktopVM) error {
	conn, err := v.connect(ctx)
	if conn == nil || err != nil {
		return err
	}
	spec, err := DesktopSpec(d.Name, d.SystemTop, d.UserTop)
	if err != nil {
		return err
	}
	spec.UUID, spec.Kernel, spec.Initrd, spec.Cmdline = d.UUID, d.Kernel, d.Initrd, d.Cmdline
	spec.MemoryMiB, spec.VCPUs, spec.SeedISO, spec.SerialLog = d.MemoryMiB, d.VCPUs, d.SeedISO, d.SerialLog
	spec.VNCListen = d.VNCListen
	if d.NIC {
		spec.MAC = d.MAC
	}
	info, err := conn.Info(ctx, d.Name)
	if err == nil {
		spec.UUID = info.UUID // the domain keeps the UUID it was defined with
	}
	if err == nil && !d.ApplyBoot {
		return conn.DefineKeeping(ctx, spec)
	}
	return conn.Define(ctx, spec)
}

// Display is the console address of the desktop's running domain.
func (v *Desktops) Display(ctx context.Context, desktop string) (string, error) {
	conn, err := v.connect(ctx)
	if err != nil {
		return "", err
	}
	if conn == nil {
		return "", fmt.Errorf("desktop %s: no libvirtd (%s)", desktop, v.URI)
	}
	return conn.Display(ctx, desktop)
}

// HardwareClass is this host's hardware class as its hypervisor runs desktops
// ("" without libvirtd).
func (v *Desktops) HardwareClass(ctx context.Context) (string, error) {
	conn, err := v.connect(ctx)
	if conn == nil || err != nil {
		return "", err
	}
	return conn.HardwareClass(ctx)
}

// StartDesktop starts the desktop's domain (a running one is left running).
func (v *Desktops) StartDesktop(ctx context.Context, desktop string) error {
	conn, err := v.connect(ctx)
	if err != nil {
		return err
	}
	if conn == nil {
		return fmt.Errorf("desktop %s: no libvirtd to start it on (%s)", desktop, v.URI)
	}
	if err := conn.Start(ctx, desktop); err != nil && !errors.Is(err, hypervisor.ErrRunning) {
		return err
	}
	return nil
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
