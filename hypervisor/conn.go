package hypervisor

import (
	"bytes"
	"context"
	"encoding/xml"
	"errors"
	"fmt"
	"net/url"
	"os"
	"strings"
	"sync"
	"time"

	libvirt "github.com/digitalocean/go-libvirt"
	"github.com/digitalocean/go-libvirt/socket/dialers"
)

// DefaultURI is the connection URI used when none is given and
// LIBVIRT_DEFAULT_URI is not set.
const DefaultURI = "qemu:///system"

// DefaultSocket is where the system libvirtd listens.
const DefaultSocket = "/run/libvirt/libvirt-sock"

// dialTimeout bounds the dial of the socket when the context has no deadline.
const dialTimeout = 5 * time.Second

// Target is a parsed connection URI: which libvirt driver, through which socket.
type Target struct {
	URI    string // as given (or the default)
	Driver string // "qemu" or "test"
	// DriverURI is what is asked of libvirtd once connected: qemu:///system,
	// test:///default (the socket parameter removed).
	DriverURI string
	Socket    string // path of libvirtd's unix socket
}

// ParseURI checks a libvirt connection URI and says where it leads. Supported:
//
//	qemu:///system                         the system libvirtd, DefaultSocket
//	qemu:///system?socket=/path/sock       a libvirtd listening elsewhere (scripts/libvirtd.sh)
//	qemu+unix:///system[?socket=...]       the same
//	test:///default[?socket=...]           libvirt's test driver, served by the same libvirtd
//
// An empty uri means $LIBVIRT_DEFAULT_URI, else DefaultURI. Remote hosts, other
// transports, qemu:///session and other drivers are refused with ErrBadURI.
func ParseURI(uri string) (Target, error) {
	if uri == "" {
		uri = os.Getenv("LIBVIRT_DEFAULT_URI")
	}
	if uri == "" {
		uri = DefaultURI
	}
	bad := func(format string, args ...any) (Target, error) {
		return Target{}, &Error{Op: "connect " + uri, Err: ErrBadURI, Msg: fmt.Sprintf(format, args...)}
	}
	u, err := url.Parse(uri)
	if err != nil {
		return bad("%v", err)
	}
	if u.Scheme == "" {
		return bad("no scheme (want e.g. qemu:///system)")
	}
	driver, transport, _ := strings.Cut(u.Scheme, "+")
	if transport != "" && transport != "unix" {
		return bad("transport %q not supported: only local unix sockets", transport)
	}
	if u.Host != "" || u.User != nil {
		return bad("remote host %q not supported: only a local libvirtd", u.Host)
	}
	switch driver {
	case "qemu":
		if u.Path != "/system" {
			return bad("path %q not supported: cvd runs domains under qemu:///system", u.Path)
		}
	case "test":
		if u.Path == "" || u.Path == "/" {
			return bad("test driver needs a path, e.g. test:///default")
		}
	default:
		return bad("driver %q not supported (want qemu or test)", driver)
	}
	q := u.Query()
	sock := DefaultSocket
	for k, v := range q {
		switch k {
		case "socket":
			if len(v) != 1 || v[0] == "" || !strings.HasPrefix(v[0], "/") {
				return bad("socket must be one absolute path")
			}
			sock = v[0]
		default:
			return bad("parameter %q not supported (only socket)", k)
		}
	}
	return Target{
		URI:       uri,
		Driver:    driver,
		DriverURI: (&url.URL{Scheme: driver, Path: u.Path}).String(),
		Socket:    sock,
	}, nil
}

// Conn is a connection to one libvirtd. Its methods are safe for concurrent use.
// A method whose context ends returns the context's error even if libvirtd has
// not answered yet (the call is then left to finish in the background).
type Conn struct {
	target  Target
	l       *libvirt.Libvirt
	virt    string // domain type for Define when DomainSpec.Type is empty
	closeMu sync.Mutex
	closed  bool
	// defineMu serializes defines: libvirtd 9.0 loads the RelaxNG schema of a
	// validated define with libxml2 in a way that races with a concurrent one
	// ("Unable to parse RNG ... is not exported by type library").
	defineMu sync.Mutex
}

// Connect connects to the libvirtd that uri names (see ParseURI). A libvirtd that
// is not running gives ErrUnavailable; a URI this package does not support,
// ErrBadURI.
func Connect(ctx context.Context, uri string) (*Conn, error) {
	t, err := ParseURI(uri)
	if err != nil {
		return nil, err
	}
	l, err := dial(ctx, t)
	if err != nil {
		return nil, err
	}
	c := &Conn{target: t, l: l}
	switch t.Driver {
	case "test":
		c.virt = "test"
	default:
		c.virt = "qemu"
		if KVMUsable() {
			c.virt = "kvm"
		}
	}
	return c, nil
}

// dial opens a go-libvirt connection to t.
func dial(ctx context.Context, t Target) (*libvirt.Libvirt, error) {
	op := "connect " + t.URI
	timeout := dialTimeout
	if d, ok := ctx.Deadline(); ok && time.Until(d) < timeout {
		timeout = max(time.Until(d), time.Millisecond)
	}
	if _, err := os.Stat(t.Socket); err != nil {
		return nil, &Error{Op: op, Err: ErrUnavailable,
			Msg: fmt.Sprintf("no socket at %s (is libvirtd running? scripts/libvirtd.sh start DIR starts one)", t.Socket)}
	}
	l := libvirt.NewWithDialer(dialers.NewLocal(dialers.WithSocket(t.Socket), dialers.WithLocalTimeout(timeout)))
	type result struct{ err error }
	done := make(chan result, 1)
	go func() { done <- result{l.ConnectToURI(libvirt.ConnectURI(t.DriverURI))} }()
	select {
	case r := <-done:
		if r.err != nil {
			e := wrap(op, "", r.err)
			var ee *Error
			if errors.As(e, &ee) && ee.Code != 0 && !errors.Is(ee.Err, ErrUnavailable) &&
				ee.Code != int(libvirt.ErrAuthFailed) && ee.Code != int(libvirt.ErrAuthCancelled) {
				// libvirtd answered but refused the driver URI.
				ee.Err = ErrBadURI
			}
			if errors.As(e, &ee) && errors.Is(ee.Err, ErrUnavailable) {
				ee.Msg += fmt.Sprintf(" (socket %s; is libvirtd running?)", t.Socket)
			}
			return nil, e
		}
		return l, nil
	case <-ctx.Done():
		// Whatever the pending connect gives, drop it.
		go func() {
			if r := <-done; r.err == nil {
				_ = l.Disconnect()
			}
		}()
		return nil, &Error{Op: op, Err: ctx.Err()}
	}
}

// URI is the connection URI.
func (c *Conn) URI() string { return c.target.URI }

// Target says where the connection leads.
func (c *Conn) Target() Target { return c.target }

// DomainType is the domain type Define uses when the spec names none: "kvm"
// when the host can really run KVM guests, "qemu" (TCG) otherwise, "test" on
// the test driver.
func (c *Conn) DomainType() string { return c.virt }

// Close disconnects. It is safe to call more than once.
func (c *Conn) Close() error {
	c.closeMu.Lock()
	defer c.closeMu.Unlock()
	if c.closed {
		return nil
	}
	c.closed = true
	done := make(chan error, 1)
	go func() { done <- c.l.Disconnect() }()
	select {
	case err := <-done:
		if err != nil && !isConnErr(err) {
			return wrap("disconnect", "", err)
		}
		return nil
	case <-time.After(10 * time.Second):
		return &Error{Op: "disconnect", Err: ErrUnavailable, Msg: "libvirtd did not answer within 10s"}
	}
}

// do runs f, a call into go-libvirt, and returns its error, or ctx's error if
// ctx ends first (f then finishes in the background). go-libvirt has no
// contexts: this keeps a wedged libvirtd from hanging the caller.
func (c *Conn) do(ctx context.Context, op, dom string, f func() error) error {
	c.closeMu.Lock()
	closed := c.closed
	c.closeMu.Unlock()
	if closed {
		return &Error{Op: op, Domain: dom, Err: ErrClosed}
	}
	if err := ctx.Err(); err != nil {
		return &Error{Op: op, Domain: dom, Err: err}
	}
	done := make(chan error, 1)
	go func() { done <- f() }()
	select {
	case err := <-done:
		return wrap(op, dom, err)
	case <-ctx.Done():
		return &Error{Op: op, Domain: dom, Err: ctx.Err()}
	}
}

// KVMUsable reports whether this host can run KVM guests: the CPU has hardware
// virtualization (vmx or svm) and /dev/kvm is not the paravirtual KVM (kvm_pvm)
// that cannot boot a normal guest kernel. Otherwise domains run under TCG.
func KVMUsable() bool {
	if _, err := os.Stat("/dev/kvm"); err != nil {
		return false
	}
	if _, err := os.Stat("/sys/module/kvm_pvm"); err == nil {
		return false
	}
	cpuinfo, err := os.ReadFile("/proc/cpuinfo")
	if err != nil {
		return false
	}
	for _, line := range bytes.Split(cpuinfo, []byte("\n")) {
		if !bytes.HasPrefix(line, []byte("flags")) {
			continue
		}
		for _, f := range bytes.Fields(line) {
			if string(f) == "vmx" || string(f) == "svm" {
				return true
			}
		}
		return false
	}
	return false
}

// HardwareClass describes this host as the hypervisor runs a desktop on it:
// the machine type cvd defines, the host CPU's vendor (from libvirt's
// capabilities) and the disk bus, as "MACHINE-VENDOR-BUS" in lower case
// ("pc-intel-virtio"). A device reports it as its hardware class when no
// class was given at its registration.
func (c *Conn) HardwareClass(ctx context.Context) (string, error) {
	var x []byte
	err := c.do(ctx, "capabilities", "", func() (err error) {
		s, err := c.l.ConnectGetCapabilities()
		x = []byte(s)
		return err
	})
	if err != nil {
		return "", err
	}
	var caps struct {
		Host struct {
			CPU struct {
				Vendor string `xml:"vendor"`
				Arch   string `xml:"arch"`
			} `xml:"cpu"`
		} `xml:"host"`
	}
	if err := xml.Unmarshal(x, &caps); err != nil {
		return "", opErr("capabilities", "", ErrInvalidSpec, "%v", err)
	}
	vendor := strings.ToLower(strings.Fields(caps.Host.CPU.Vendor + " unknown")[0])
	if vendor == "unknown" {
		vendor = cpuVendor()
	}
	return fmt.Sprintf("%s-%s-virtio", DefaultMachine, vendor), nil
}

// cpuVendor is the vendor of this machine's CPU from /proc/cpuinfo, for a
// driver whose capabilities do not name it (the test driver; a remote
// libvirtd names its own).
func cpuVendor() string {
	b, _ := os.ReadFile("/proc/cpuinfo")
	for _, line := range strings.Split(string(b), "\n") {
		if k, v, ok := strings.Cut(line, ":"); ok && strings.TrimSpace(k) == "vendor_id" {
			switch v = strings.TrimSpace(v); v {
			case "GenuineIntel":
				return "intel"
			case "AuthenticAMD":
				return "amd"
			default:
				return strings.ToLower(v)
			}
		}
	}
	return "unknown"
}
