package disk

import (
	"errors"
	"fmt"
)

// Sentinel errors. Test with errors.Is.
var (
	// ErrNotQcow2 is returned when a file expected to be qcow2 lacks the magic.
	ErrNotQcow2 = errors.New("not a qcow2 image")
	// ErrCorrupt is what every *FormatError unwraps to: the image breaks the format.
	ErrCorrupt = errors.New("corrupt image")
	// ErrUnsupported marks a valid image that uses a feature cvd does not handle
	// (another format such as vmdk, legacy AES encryption, an external data file, extended L2
	// entries, or writing into an image with internal snapshots or bitmaps).
	ErrUnsupported = errors.New("unsupported image feature")
	// ErrBackingEscape: a backing file name resolves outside the allowed roots.
	ErrBackingEscape = errors.New("backing file outside allowed roots")
	// ErrBackingLoop: the chain refers back to an image already in it.
	ErrBackingLoop = errors.New("backing chain loop")
	// ErrChainTooDeep: the chain is longer than OpenOptions.MaxDepth.
	ErrChainTooDeep = errors.New("backing chain too deep")
	// ErrReadOnly: a write to an image opened read-only.
	ErrReadOnly = errors.New("image is read-only")
	// ErrOutOfRange: an access beyond the virtual size.
	ErrOutOfRange = errors.New("access beyond end of disk")
	// ErrClosed: use of an image after Close.
	ErrClosed = errors.New("image is closed")
	// ErrInUse: another process (a running VM's QEMU) holds the image open.
	ErrInUse = errors.New("image is open in another process (QEMU holds its lock)")
	// ErrKeyRequired: the data of an encrypted layer was read or written, and
	// no key was given for it.
	ErrKeyRequired = errors.New("encrypted image: no key given")
	// ErrNotEncrypted: a key operation on a plain layer.
	ErrNotEncrypted = errors.New("image is not encrypted")
	// ErrBadKey: the key given for an encrypted layer opens none of its key slots.
	ErrBadKey = errors.New("encrypted image: the key opens no key slot (wrong key, or the keys were shredded)")
)

// FormatError describes a violation of the qcow2 format found at a byte offset of
// the file. It unwraps to ErrCorrupt.
type FormatError struct {
	Offset int64  // host offset of the offending field or table, -1 if unknown
	Field  string // e.g. "l1_table_offset", "L2 entry"
	Msg    string
}

func (e *FormatError) Error() string {
	if e.Offset >= 0 {
		return fmt.Sprintf("qcow2: %s at %#x: %s", e.Field, e.Offset, e.Msg)
	}
	return fmt.Sprintf("qcow2: %s: %s", e.Field, e.Msg)
}

// Unwrap makes errors.Is(err, ErrCorrupt) true.
func (e *FormatError) Unwrap() error { return ErrCorrupt }

func formatErr(off int64, field, format string, args ...any) error {
	return &FormatError{Offset: off, Field: field, Msg: fmt.Sprintf(format, args...)}
}
