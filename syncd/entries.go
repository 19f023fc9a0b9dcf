package syncd

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

func appendEntry(b []byte, e Entry) []byte {
	b = binary.BigEndian.AppendUint64(b, uint64(e.Index))
	if e.Zero {
		return append(b, 'z')
	}
	b = append(b, 'd')
	return append(b, e.Digest[:]...)
}

// readEntries decodes an entry list of exactly want entries whose indexes are
// ascending and below clusters; zero entries are allowed only when zeroOK.
func readEntries(r io.Reader, want, clusters int64, zeroOK bool, fn func(Entry) error) error {
	br := bufio.NewReaderSize(r, 64<<10)
	var hdr [9]byte
	prev := int64(-1)
	for n := int64(0); ; n++ {
		if _, err := io.ReadFull(br, hdr[:]); err != nil {
			if err == io.EOF && n == want {
				return nil
			}
			if err == io.EOF || err == io.ErrUnexpectedEOF {
				return badRequest("entry list: %d entries, declared %d", n, want)
			}
			return err
		}
		if n == want {
			return badRequest("entry list longer than the %d entries declared", want)
		}
		e := Entry{Index: int64(binary.BigEndian.Uint64(hdr[:8]))}
		if e.Index <= prev || e.Index >= clusters || e.Index < 0 {
			return badRequest("entry list: index %d out of order or beyond %d clusters", e.Index, clusters)
		}
		prev = e.Index
		switch hdr[8] {
		case 'z':
			if !zeroOK {
				return badRequest("entry list: zero entry in a layer without a parent")
			}
			e.Zero = true
		case 'd':
			if _, err := io.ReadFull(br, e.Digest[:]); err != nil {
				return badRequest("entry list: truncated digest")
			}
		default:
			return badRequest("entry list: unknown tag %#x", hdr[8])
		}
		if err := fn(e); err != nil {
			return err
		}
	}
}

// missingItem is a cluster the server still needs.
type missingItem struct {
	Disk   byte
	Index  int64
	Digest Digest
}

const missingItemSize = 1 + 8 + 32

func appendMissing(b []byte, m missingItem) []byte {
	b = append(b, m.Disk)
	b = binary.BigEndian.AppendUint64(b, uint64(m.Index))
	return append(b, m.Digest[:]...)
}

func readMissing(r io.Reader, fn func(missingItem) error) error {
	br := bufio.NewReaderSize(r, 64<<10)
	var b [missingItemSize]byte
	for {
		if _, err := io.ReadFull(br, b[:]); err != nil {
			if err == io.EOF {
				return nil
			}
			return fmt.Errorf("%w: missing list: %v", errStream, err)
		}
		m := missingItem{Disk: b[0], Index: int64(binary.BigEndian.Uint64(b[1:9]))}
		copy(m.Digest[:], b[9:])
		if err := fn(m); err != nil {
			return err
		}
	}
}

// entrySums turns a disk's entries into the cluster list images.Adopt takes.
func entrySums(entries iter.Seq[Entry], size int64, cs int) iter.Seq[images.ClusterSum] {
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

// listEntries iterates over an entry list this process encoded (appendEntry).
func listEntries(list []byte) iter.Seq[Entry] {
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
