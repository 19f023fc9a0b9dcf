package proto

import (
	"errors"
	"fmt"
	"io/fs"
	"net/http"
	"syscall"

	"github.com/cvd-project/cvd/desktop"
	"github.com/cvd-project/cvd/images"
)

// Sentinel errors. Test with errors.Is; a client gets the same sentinel as the server
// returned (the API carries it as the "code" of the error body).
var (
	// ErrUnauthorized: a missing, malformed or wrong device token.
	ErrUnauthorized = errors.New("unauthorized")
	// ErrForbidden: the device is not bound to the desktop.
	ErrForbidden = errors.New("device not bound to desktop")
	// ErrLeaseHeld: another device holds the desktop's lease. The error is a
	// *LeaseError that names the holder.
	ErrLeaseHeld = errors.New("lease held by another device")
	// ErrWiped: an administrator ordered the device wiped; it must shred its
	// encrypted copies, and its token works no more.
	ErrWiped = errors.New("device wiped by the administrator")
	// ErrLeaseExpired: the caller's lease is past its expiry.
	ErrLeaseExpired = errors.New("lease expired")
	// ErrNoLease: the call needs a lease the caller does not hold.
	ErrNoLease = errors.New("no lease")
	// ErrDigestMismatch: a cluster's bytes do not match its digest (a tampered or
	// corrupted transfer). Nothing of it is stored.
	ErrDigestMismatch = errors.New("cluster digest mismatch")
	// ErrBadRequest: a malformed request or stream.
	ErrBadRequest = errors.New("malformed request")
	// ErrNotFound: no such desktop, layer, version, device or check-in.
	ErrNotFound = images.ErrNotFound
	// ErrNoSpace: the store's file system is full (on either side).
	ErrNoSpace = errors.New("no space left on the store's file system")
	// ErrIncomplete: a commit asked for before every missing cluster arrived.
	ErrIncomplete = errors.New("check-in incomplete")
	// ErrLocalChanges: the laptop's copy holds changes that were not checked in.
	ErrLocalChanges = errors.New("local changes not checked in")
	// ErrNotCheckedOut: the desktop is not checked out to this store.
	ErrNotCheckedOut = errors.New("desktop not checked out here")
	// ErrExpired: the local copy's lease expired; it has been purged.
	ErrExpired = errors.New("checked-out copy expired")
	// ErrInUse: a desktop's top is open in a running VM (QEMU holds its image
	// lock): it is not sealed or checked in. Wraps disk.ErrInUse.
	// ErrTooMany: a device has as many check-ins open as the server allows.
	ErrTooMany = errors.New("too many open check-ins")
	ErrInUse   = desktop.ErrInUse
	// ErrNotActive: a system-disk change from a device that is not the
	// desktop's active device (a *LeaseError names the active one).
	ErrNotActive = errors.New("not the active device")
	// ErrNoVariant: a device under the apps policy whose hardware class has no
	// base variant for the desktop's base.
	ErrNoVariant = desktop.ErrNoVariant
	// ErrTooSoon: a device asked for the active role within the minimum
	// interval after another device took it.
	ErrTooSoon = errors.New("the active role changed too recently")
)

// LeaseError says who holds a lease.
type LeaseError struct {
	Desktop string `json:"desktop"`
	Holder  string `json:"holder"`  // device name
	Expires string `json:"expires"` // RFC 3339
	Err     error  `json:"-"`
}

func (e *LeaseError) Error() string {
	return fmt.Sprintf("desktop %s: %v: held by device %s until %s", e.Desktop, e.Err, e.Holder, e.Expires)
}

// Unwrap gives the sentinel.
func (e *LeaseError) Unwrap() error { return e.Err }

// errorCodes maps sentinels to the API's error codes and HTTP statuses.
var errorCodes = []struct {
	err    error
	code   string
	status int
}{
	{ErrUnauthorized, "unauthorized", http.StatusUnauthorized},
	{ErrForbidden, "forbidden", http.StatusForbidden},
	{ErrLeaseHeld, "lease_held", http.StatusConflict},
	{ErrLeaseExpired, "lease_expired", http.StatusConflict},
	{ErrWiped, "wiped", http.StatusGone},
	{ErrNoLease, "no_lease", http.StatusConflict},
	{ErrDigestMismatch, "digest_mismatch", http.StatusBadRequest},
	{ErrBadRequest, "bad_request", http.StatusBadRequest},
	{ErrStream, "bad_request", http.StatusBadRequest},
	{ErrNotFound, "not_found", http.StatusNotFound},
	{ErrNoSpace, "no_space", http.StatusInsufficientStorage},
	{ErrIncomplete, "incomplete", http.StatusConflict},
	{ErrInUse, "in_use", http.StatusConflict},
	{ErrTooMany, "too_many", http.StatusTooManyRequests},
	{ErrNotActive, "not_active", http.StatusConflict},
	{ErrNoVariant, "no_variant", http.StatusConflict},
	{ErrTooSoon, "too_soon", http.StatusConflict},
}

func CodeOf(err error) (string, int) {
	for _, c := range errorCodes {
		if errors.Is(err, c.err) {
			return c.code, c.status
		}
	}
	return "internal", http.StatusInternalServerError
}

func SentinelOf(code string) error {
	for _, c := range errorCodes {
		if c.code == code {
			return c.err
		}
	}
	return nil
}

// NoSpace turns ENOSPC and EDQUOT into ErrNoSpace, keeping the message.
func NoSpace(err error) error {
	if err == nil || errors.Is(err, ErrNoSpace) {
		return err
	}
	if errors.Is(err, syscall.ENOSPC) || errors.Is(err, syscall.EDQUOT) {
		return fmt.Errorf("%w: %v", ErrNoSpace, err)
	}
	var pe *fs.PathError
	if errors.As(err, &pe) && (errors.Is(pe.Err, syscall.ENOSPC) || errors.Is(pe.Err, syscall.EDQUOT)) {
		return fmt.Errorf("%w: %v", ErrNoSpace, err)
	}
	return err
}

// BadRequest wraps a decoding error as ErrBadRequest.
func BadRequest(format string, a ...any) error {
	return fmt.Errorf("%w: %s", ErrBadRequest, fmt.Sprintf(format, a...))
}
