package hypervisor

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"syscall"

	libvirt "github.com/digitalocean/go-libvirt"
)

// Errors. Every error this package returns for an operation on a domain is an
// *Error naming the operation and the domain, and unwraps to one of these when
// the cause is known.
var (
	// ErrNotFound: no domain of that name.
	ErrNotFound = errors.New("domain not found")
	// ErrUnavailable: libvirtd cannot be reached (not running, socket missing,
	// connection lost).
	ErrUnavailable = errors.New("libvirtd unavailable")
	// ErrBadURI: a connection URI this package does not support or cannot parse.
	ErrBadURI = errors.New("unsupported libvirt URI")
	// ErrInvalidSpec: a DomainSpec, domain XML or argument that cannot make a
	// domain or that libvirt refuses.
	ErrInvalidSpec = errors.New("invalid domain spec")
	// ErrExists: a domain of that name exists with another UUID, or a file that
	// must be new exists.
	ErrExists = errors.New("already exists")
	// ErrNotRunning: the operation needs a running domain.
	ErrNotRunning = errors.New("domain not running")
	// ErrRunning: the operation needs a domain that is shut off.
	ErrRunning = errors.New("domain is running")
	// ErrUnsupported: the driver does not support the operation or a flag of it.
	ErrUnsupported = errors.New("not supported by the driver")
	// ErrClosed: the Conn was closed.
	ErrClosed = errors.New("connection closed")
)

// Error is an operation on a domain (or on the connection) that failed.
type Error struct {
	Op     string // "define", "start", "shutdown", ...
	Domain string // domain name; empty for connection-wide operations
	// Code is libvirt's error number (virErrorNumber) when libvirt reported the
	// error, else 0.
	Code int
	// Msg is libvirt's message, or a message of this package.
	Msg string
	// Err is a sentinel of this package, or the underlying error when none fits
	// (never a go-libvirt type).
	Err error
}

func (e *Error) Error() string {
	s := e.Op
	if e.Domain != "" {
		s += fmt.Sprintf(" domain %q", e.Domain)
	}
	if e.Err != nil {
		s += ": " + e.Err.Error()
	}
	if e.Msg != "" {
		s += ": " + e.Msg
	}
	return s
}

func (e *Error) Unwrap() error { return e.Err }

// opErr builds an *Error around a sentinel and a message.
func opErr(op, dom string, sentinel error, format string, args ...any) error {
	return &Error{Op: op, Domain: dom, Err: sentinel, Msg: fmt.Sprintf(format, args...)}
}

// wrap converts an error from go-libvirt (or the connection under it) into an
// *Error. Context errors and *Error pass through with the operation named.
func wrap(op, dom string, err error) error {
	if err == nil {
		return nil
	}
	var e *Error
	if errors.As(err, &e) {
		return err
	}
	if errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		return &Error{Op: op, Domain: dom, Err: err}
	}
	var lerr libvirt.Error
	if errors.As(err, &lerr) {
		out := &Error{Op: op, Domain: dom, Code: int(lerr.Code), Msg: lerr.Message}
		switch libvirt.ErrorNumber(lerr.Code) {
		case libvirt.ErrNoDomain:
			out.Err = ErrNotFound
		case libvirt.ErrDomExist:
			out.Err = ErrExists
		case libvirt.ErrNoConnect, libvirt.ErrRPC:
			out.Err = ErrUnavailable
		case libvirt.ErrNoSupport, libvirt.ErrOperationUnsupported:
			out.Err = ErrUnsupported
		case libvirt.ErrXMLError, libvirt.ErrXMLDetail, libvirt.ErrInvalidArg, libvirt.ErrConfigUnsupported:
			out.Err = ErrInvalidSpec
			if containsAny(lerr.Message, "unsupported flags") {
				out.Err = ErrUnsupported
			}
		case libvirt.ErrOperationInvalid:
			// "domain is not running" / "domain is already running"
			switch {
			case containsAny(lerr.Message, "not running", "is not active"):
				out.Err = ErrNotRunning
			case containsAny(lerr.Message, "already running", "is active", "domain is running"):
				out.Err = ErrRunning
			}
		case libvirt.ErrOperationFailed:
			if containsAny(lerr.Message, "already exists") {
				out.Err = ErrExists
			}
		}
		return out
	}
	if isConnErr(err) {
		msg := err.Error()
		if errors.Is(err, libvirt.ErrInterrupted) || errors.Is(err, syscall.EINVAL) {
			// go-libvirt's words for a socket that closed under it.
			msg = "the connection to libvirtd was lost (did libvirtd stop?)"
		}
		return &Error{Op: op, Domain: dom, Err: ErrUnavailable, Msg: msg}
	}
	return &Error{Op: op, Domain: dom, Err: err}
}

// isConnErr reports whether err means the connection to libvirtd is gone or
// was never there.
func isConnErr(err error) bool {
	var nerr net.Error
	return errors.Is(err, libvirt.ErrInterrupted) ||
		errors.Is(err, syscall.EINVAL) || // go-libvirt's "not connected"
		errors.Is(err, syscall.ECONNREFUSED) || errors.Is(err, syscall.ENOENT) ||
		errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE) ||
		errors.Is(err, io.EOF) || errors.Is(err, net.ErrClosed) ||
		errors.As(err, &nerr)
}

// isCode reports whether err carries libvirt error number code.
func isCode(err error, code libvirt.ErrorNumber) bool {
	var e *Error
	if errors.As(err, &e) {
		return e.Code == int(code)
	}
	var lerr libvirt.Error
	return errors.As(err, &lerr) && lerr.Code == uint32(code)
}

func containsAny(s string, subs ...string) bool {
	for _, sub := range subs {
		if strings.Contains(s, sub) {
			return true
		}
	}
	return false
}
