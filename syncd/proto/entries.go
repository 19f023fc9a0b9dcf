package proto

import (
	"bufio"
	"encoding/binary"
	"fmt"
	"io"
	"iter"

	"github.com/cvd-project/cvd/images"
)

// Entry lists (PUT /v1/checkins/{id}/entries/{disk}) are the clusters a laptop's
// top allocates, ascending: 8-byte big-endian index, then 'z' (reads as zeros) or
// 'd' and the 32-byte SHA-256 of the cluster.
//
// Missing lists (GET /v1/checkins/{id}/missing) are what the server still needs:
// 1-byte disk number, 8-byte index, 32-byte digest, one per distinct digest.

func AppendEntry(b []byte, e Entry) []byte {
	b = binary.BigEndian.AppendUint64(b, uint64(e.Index))
	if e.Zero {
		return append(b, 'z')
	}
	b = append(b, 'd')
	return append(b, e.Digest[:]...)
}

// ReadEntries decodes an entry list of exactly want entries whose indexes are
// ascending and below clusters; zero entries are allowed only when zeroOK.
func ReadEntries(r io.Reader, want, clusters int64, zeroOK bool, fn func(Entry) error) error {
	br := bufio.NewReaderSize(r, 64<<10)
	var hdr [9]byte
	prev := int64(-1)
	for n := int64(0); ; n++ {
		if _, err := io.ReadFull(br, hdr[:]); err != nil {
			if err == io.EOF && n == want {
				return nil
			}
			if err == io.EOF || err == io.ErrUnexpectedEOF {
				return BadRequest("entry list: %d entries, declared %d", n, want)
			}
			return err
		}
		if n == want {
			return BadRequest("entry list longer than the %d entries declared", want)
		}
		e := Entry{Index: int64(binary.BigEndian.Uint64(hdr[:8]))}
		if e.Index <= prev || e.Index >= clusters || e.Index < 0 {
			return BadRequest("entry list: index %d out of order or beyond %d clusters", e.Index, clusters)
		}
		prev = e.Index
		switch hdr[8] {
		case 'z':
			if !zeroOK {
				return BadRequest("entry list: zero entry in a layer without a parent")
			}
			e.Zero = true
		case 'd':
			if _, err := io.ReadFull(br, e.Digest[:]); err != nil {
				return BadRequest("entry list: truncated digest")
			}
		default:
			return BadRequest("entry list: unknown tag %#x", hdr[8])
		}
		if err := fn(e); err != nil {
			return err
		}
	}
}

// MissingItem is a cluster the server still needs.
type MissingItem struct {
	Disk   byte
	Index  int64
	Digest Digest
}

const MissingItemSize = 1 + 8 + 32

func AppendMissing(b []byte, m MissingItem) []byte {
	b = append(b, m.Disk)
	b = binary.BigEndian.AppendUint64(b, uint64(m.Index))
	return append(b, m.Digest[:]...)
}

func ReadMissing(r io.Reader, fn func(MissingItem) error) error {
	br := bufio.NewReaderSize(r, 64<<10)
	var b [MissingItemSize]byte
	for {
		if _, err := io.ReadFull(br, b[:]); err != nil {
			if err == io.EOF {
				return nil
			}
			return fmt.Errorf("%w: missing list: %v", ErrStream, err)
		}
		m := MissingItem{Disk: b[0], Index: int64(binary.BigEndian.Uint64(b[1:9]))}
		copy(m.Digest[:], b[9:])
		if err := fn(m); err != nil {
			return err
		}
	}
}

// EntrySums turns a disk's entries into the cluster list images.Adopt takes.
func EntrySums(entries iter.Seq[Entry], size int64, cs int) iter.Seq[images.ClusterSum] {
	return func(yield func(images.ClusterSum) bool) {
		for e := range entries {
			c := images.ClusterSum{Index: e.Index, Zero: e.Zero}
			if !e.Zero {
				c.Digest, c.Len = e.Digest, int(min(int64(cs), size-e.Index*int64(cs)))
			}
			if !yield(c) {
				return
			}
		}
	}
}

// ListEntries iterates over an entry list this process encoded (appendEntry).
func ListEntries(list []byte) iter.Seq[Entry] {
	return func(yield func(Entry) bool) {
		for len(list) >= 9 {
			e := Entry{Index: int64(binary.BigEndian.Uint64(list)), Zero: list[8] == 'z'}
			list = list[9:]
			if !e.Zero {
				if len(list) < len(e.Digest) {
					return
				}
				copy(e.Digest[:], list)
				list = list[len(e.Digest):]
			}
			if !yield(e) {
				return
			}
		}
	}
}
