package disk

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"sync"
	"unsafe"
)

// File is what a qcow2 layer is read from and written to; *os.File satisfies it.
type File interface {
	io.ReaderAt
	io.WriterAt
	Sync() error
	Close() error
}

// Qcow2 is one qcow2 layer with its backing chain.
type Qcow2 struct {
	mu       sync.RWMutex
	f        File
	path     string
	h        *header
	readOnly bool
	backing  Image
	closed   bool
	// barriers: fsync between the steps of a metadata update. Off only for
	// images being built from scratch (convert), which are synced once at the end.
	barriers bool

	cb       uint  // cluster bits
	cs       int64 // cluster size
	l2Bits   uint
	l2Mask   int64
	refBits  uint  // bits per refcount
	rpbBits  uint  // log2 of refcounts per block
	fileSize int64 // bytes in the file (grows as we append)

	l1       []uint64
	refTable []uint64

	l2Cache *tableCache
	rbCache *tableCache

	freeHint int64 // lowest cluster index that may be free

	cmu      sync.Mutex // guards the decompressed-cluster cache
	cOff     uint64     // L2 entry of the cached decompressed cluster
	cBuf     []byte
	compPos  int64 // next free byte for compressed writes (0: none)
	firstErr error // a failed metadata write: later writes are refused

	pendingRefs *pending

	scratch sync.Pool // cluster-sized buffers for reading L2 tables uncached

	direct       *os.File // O_DIRECT descriptor for aligned data writes (OpenOptions.DirectData), or nil
	directWrites int64    // writes that went through it

	// crypt en/decrypts data clusters of a LUKS layer; nil for a plain layer
	// and for an encrypted one opened without its key (then data access fails
	// with ErrKeyRequired).
	crypt      *sectorCipher
	passphrase []byte
}

var _ Image = (*Qcow2)(nil)

// cacheBytes bounds the memory of one layer's metadata caches.
const cacheBytes = 16 << 20

// newQcow2 parses a qcow2 layer from f (size bytes). backing, when not nil, is the
// already-opened next layer down.
func newQcow2(f File, path string, size int64, readOnly bool) (*Qcow2, error) {
	// The header, its extensions and the backing name fit in the first cluster:
	// read 64 KiB, and the rest of a larger first cluster when there is one.
	first := make([]byte, min(size, 64<<10))
	if _, err := f.ReadAt(first, 0); err != nil && !errors.Is(err, io.EOF) {
		return nil, fmt.Errorf("read header: %w", err)
	}
	if len(first) >= 24 {
		if cb := binary.BigEndian.Uint32(first[20:]); cb > 16 && cb <= 21 && size > int64(len(first)) {
			more := make([]byte, min(size, 1<<cb))
			if _, err := f.ReadAt(more, 0); err != nil && !errors.Is(err, io.EOF) {
				return nil, fmt.Errorf("read header: %w", err)
			}
			first = more
		}
	}
	h, err := parseHeader(first, size)
	if err != nil {
		return nil, err
	}
	q := &Qcow2{
		f: f, path: path, h: h, readOnly: readOnly, barriers: true,
		cb: uint(h.clusterBits), cs: 1 << h.clusterBits,
		refBits: 1 << h.refcountOrder, fileSize: size,
	}
	q.l2Bits = q.cb - 3
	q.l2Mask = 1<<q.l2Bits - 1
	q.rpbBits = q.cb + 3 - uint(h.refcountOrder)
	n := max(8, int(cacheBytes/q.cs))
	q.l2Cache = newTableCache(n)
	q.rbCache = newTableCache(n)

	if err := q.loadTables(); err != nil {
		return nil, err
	}
	if !readOnly {
		switch {
		case h.nbSnapshots > 0:
			return nil, fmt.Errorf("%w: writing an image with %d internal snapshots", ErrUnsupported, h.nbSnapshots)
		case h.hasBitmapsExt || h.autoclear&autoclearBitmaps != 0:
			return nil, fmt.Errorf("%w: writing an image with persistent bitmaps", ErrUnsupported)
		case h.incompat&incompatDirty != 0:
			return nil, fmt.Errorf("%w: image is dirty (lazy refcounts were in use); repair it with qemu-img check -r all", ErrUnsupported)
		}
	}
	return q, nil
}

// unlock opens the LUKS key slots of an encrypted layer with pass.
func (q *Qcow2) unlock(pass []byte) error {
	region := q.h.cryptLength
	hdr := make([]byte, luksPhdrLen)
	if _, err := q.f.ReadAt(hdr, int64(q.h.cryptOffset)); err != nil {
		return fmt.Errorf("read LUKS header at %#x: %w", q.h.cryptOffset, err)
	}
	lh, err := parseLUKS(hdr, int64(region))
	if err != nil {
		return err
	}
	c, err := lh.unlock(pass, func(off, n int64) ([]byte, error) {
		b := make([]byte, n)
		_, err := q.f.ReadAt(b, int64(q.h.cryptOffset)+off)
		return b, err
	})
	if err != nil {
		return err
	}
	q.crypt, q.passphrase = c, pass
	return nil
}

// Passphrase is the key that unlocked img's encrypted layer (this layer only,
// not the chain below), or nil for a plain or locked layer: what QEMU needs to
// open it too.
func Passphrase(img Image) []byte {
	if q, ok := img.(*Qcow2); ok && q.crypt != nil {
		return q.passphrase
	}
	return nil
}

func (q *Qcow2) loadTables() error {
	h := q.h
	buf := make([]byte, int64(h.l1Size)*8)
	if _, err := q.f.ReadAt(buf, int64(h.l1Offset)); err != nil {
		return fmt.Errorf("read L1 table at %#x: %w", h.l1Offset, err)
	}
	q.l1 = make([]uint64, h.l1Size)
	for i := range q.l1 {
		e := binary.BigEndian.Uint64(buf[i*8:])
		if e&l1ReservedMask != 0 && e&l1OffsetMask == 0 {
			return formatErr(int64(h.l1Offset)+int64(i)*8, "L1 entry", "reserved bits set in %#x", e)
		}
		q.l1[i] = e
	}
	rt := make([]byte, int64(h.refTableClusters)*q.cs)
	if _, err := q.f.ReadAt(rt, int64(h.refTableOffset)); err != nil {
		return fmt.Errorf("read refcount table at %#x: %w", h.refTableOffset, err)
	}
	q.refTable = make([]uint64, len(rt)/8)
	for i := range q.refTable {
		q.refTable[i] = binary.BigEndian.Uint64(rt[i*8:])
	}
	return nil
}

// Info describes this layer.
func (q *Qcow2) Info() Info {
	q.mu.RLock()
	defer q.mu.RUnlock()
	comp := "deflate"
	if q.h.compressionType == compressionZstd {
		comp = "zstd"
	}
	return Info{
		Path: q.path, Format: FormatQcow2, Version: int(q.h.version), Size: int64(q.h.size),
		ClusterSize: int(q.cs), BackingName: q.h.backingName, BackingFormat: Format(q.h.backingFormat),
		FileSize: q.fileSize, ReadOnly: q.readOnly, Compression: comp, RefcountBits: int(q.refBits),
		Snapshots: int(q.h.nbSnapshots), Bitmaps: q.h.hasBitmapsExt,
		Encrypted: q.h.cryptMethod == cryptLUKS, Unlocked: q.crypt != nil,
	}
}

// Size is the virtual size.
func (q *Qcow2) Size() int64 { return int64(q.h.size) }

// ClusterSize in bytes.
func (q *Qcow2) ClusterSize() int { return int(q.cs) }

// Backing is the next layer down, or nil.
func (q *Qcow2) Backing() Image { return q.backing }

// Close closes this layer and the chain below it.
func (q *Qcow2) Close() error {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.closed {
		return nil
	}
	q.closed = true
	var errs []error
	if !q.readOnly {
		if err := q.f.Sync(); err != nil {
			errs = append(errs, fmt.Errorf("sync %s: %w", q.path, err))
		}
	}
	errs = append(errs, q.f.Close())
	q.closeDirect()
	if q.backing != nil {
		errs = append(errs, q.backing.Close())
	}
	return errors.Join(errs...)
}

// Flush makes completed writes durable.
func (q *Qcow2) Flush() error {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.closed {
		return ErrClosed
	}
	if q.readOnly {
		return nil
	}
	if err := q.f.Sync(); err != nil {
		return fmt.Errorf("sync %s: %w", q.path, err)
	}
	return nil
}

// barrier orders metadata updates on disk.
func (q *Qcow2) barrier() error {
	if !q.barriers {
		return nil
	}
	if err := q.f.Sync(); err != nil {
		return fmt.Errorf("sync %s: %w", q.path, err)
	}
	return nil
}

// l2Entry returns the L2 entry for guest cluster gc (0 when the L1 entry is empty).
func (q *Qcow2) l2Entry(gc int64) (uint64, error) {
	tbl, _, err := q.l2Table(gc>>q.l2Bits, false)
	if err != nil || tbl == nil {
		return 0, err
	}
	return binary.BigEndian.Uint64(tbl[(gc&q.l2Mask)*8:]), nil
}

// l2Table loads the L2 table of L1 index i. With alloc false it returns nil for an
// empty L1 entry.
func (q *Qcow2) l2Table(i int64, alloc bool) ([]byte, int64, error) {
	if i < 0 || i >= int64(len(q.l1)) {
		return nil, 0, formatErr(-1, "L1 index", "%d beyond l1_size %d", i, len(q.l1))
	}
	e := q.l1[i]
	off := int64(e & l1OffsetMask)
	if off == 0 {
		if !alloc {
			return nil, 0, nil
		}
		if err := q.allocL2([]int64{i}); err != nil {
			return nil, 0, err
		}
		e = q.l1[i]
		off = int64(e & l1OffsetMask)
	}
	if off%q.cs != 0 || off+q.cs > q.fileSize {
		return nil, 0, formatErr(int64(q.h.l1Offset)+i*8, "L1 entry", "L2 table offset %#x unaligned or past the end of the file", off)
	}
	if t := q.l2Cache.get(off); t != nil {
		return t, off, nil
	}
	t := make([]byte, q.cs)
	if _, err := q.f.ReadAt(t, off); err != nil {
		return nil, 0, fmt.Errorf("read L2 table at %#x: %w", off, err)
	}
	return q.l2Cache.put(off, t), off, nil
}

// kind of an L2 entry.
type entryKind uint8

const (
	kUnalloc entryKind = iota
	kZero
	kNormal
	kCompressed
)

// classify decodes an L2 entry for guest cluster gc.
func (q *Qcow2) classify(e uint64, gc int64) (entryKind, int64, error) {
	if e&oflagCompress != 0 {
		if e&oflagCopied != 0 {
			return 0, 0, formatErr(-1, "L2 entry", "compressed cluster %d has the COPIED flag", gc)
		}
		return kCompressed, 0, nil
	}
	off := int64(e & l2OffsetMask)
	if e&oflagZero != 0 && q.h.version >= 3 {
		return kZero, off, nil
	}
	if off == 0 {
		return kUnalloc, 0, nil
	}
	if off%q.cs != 0 {
		return 0, 0, formatErr(-1, "L2 entry", "cluster %d: host offset %#x is not cluster-aligned", gc, off)
	}
	if off >= q.fileSize {
		return 0, 0, formatErr(-1, "L2 entry", "cluster %d: host offset %#x past the end of the file (%d bytes)", gc, off, q.fileSize)
	}
	return kNormal, off, nil
}

// compressedRange decodes a compressed descriptor: byte offset of the data and the
// number of bytes that may hold it (sector-rounded, as QEMU reads it).
func (q *Qcow2) compressedRange(e uint64) (off, n int64) {
	shift := 62 - (q.cb - 8)
	mask := uint64(1)<<(q.cb-8) - 1
	off = int64(e & (1<<shift - 1))
	sectors := int64((e>>shift)&mask) + 1
	n = sectors*512 - off&511
	return off, n
}

// readCompressed returns the decompressed bytes of the cluster described by e.
func (q *Qcow2) readCompressed(e uint64, gc int64) ([]byte, error) {
	q.cmu.Lock()
	if q.cBuf != nil && q.cOff == e {
		b := q.cBuf
		q.cmu.Unlock()
		return b, nil
	}
	q.cmu.Unlock()
	off, n := q.compressedRange(e)
	if off >= q.fileSize {
		return nil, formatErr(-1, "L2 entry", "cluster %d: compressed data at %#x past the end of the file", gc, off)
	}
	n = min(n, q.fileSize-off)
	src := make([]byte, n)
	if _, err := q.f.ReadAt(src, off); err != nil && !errors.Is(err, io.EOF) {
		return nil, fmt.Errorf("read compressed cluster %d at %#x: %w", gc, off, err)
	}
	out := make([]byte, q.cs)
	if err := decompress(q.h.compressionType, src, out); err != nil {
		return nil, &FormatError{Offset: off, Field: "compressed cluster", Msg: fmt.Sprintf("guest cluster %d: %v", gc, err)}
	}
	q.cmu.Lock()
	q.cOff, q.cBuf = e, out
	q.cmu.Unlock()
	return out, nil
}

// ReadAt reads the guest view of the chain. Reads that extend past the virtual
// size return the bytes before it and io.EOF.
func (q *Qcow2) ReadAt(p []byte, off int64) (int, error) {
	q.mu.RLock()
	defer q.mu.RUnlock()
	if q.closed {
		return 0, ErrClosed
	}
	return q.readAt(p, off)
}

func (q *Qcow2) readAt(p []byte, off int64) (int, error) {
	if off < 0 {
		return 0, fmt.Errorf("read at %d: %w", off, ErrOutOfRange)
	}
	size := int64(q.h.size)
	if off >= size {
		if len(p) == 0 {
			return 0, nil
		}
		return 0, io.EOF
	}
	want := p
	if int64(len(p)) > size-off {
		p = p[:size-off]
	}
	// Walk clusters, merging runs of the same source into one read.
	var (
		runKind  entryKind
		runStart int   // index in p
		runHost  int64 // host offset of p[runStart] for kNormal
		runLen   int
		// sealed are the runs of an encrypted layer read as ciphertext, to
		// decrypt together at the end (on every core).
		sealed []cryptRun
	)
	flush := func() error {
		if runLen == 0 {
			return nil
		}
		dst := p[runStart : runStart+runLen]
		gOff := off + int64(runStart)
		switch runKind {
		case kUnalloc:
			if err := readBacking(q.backing, dst, gOff); err != nil {
				return err
			}
		case kZero:
			clear(dst)
		case kNormal:
			if q.crypt != nil && (runHost|int64(len(dst)))&(luksSector-1) == 0 {
				n, err := q.f.ReadAt(dst, runHost)
				if err != nil {
					if !errors.Is(err, io.EOF) {
						return fmt.Errorf("read data at %#x: %w", runHost, err)
					}
					clear(dst[n:])
				}
				sealed = append(sealed, cryptRun{dst, uint64(runHost / luksSector)})
				break
			}
			n, err := q.readData(dst, runHost)
			if err != nil {
				if errors.Is(err, io.EOF) {
					// A cluster at the very end of a file that was not fully written.
					clear(dst[n:])
				} else {
					return fmt.Errorf("read data at %#x: %w", runHost, err)
				}
			}
		}
		runLen = 0
		return nil
	}
	pos := 0
	for pos < len(p) {
		g := off + int64(pos)
		gc := g >> q.cb
		in := g & (q.cs - 1)
		n := int(min(q.cs-in, int64(len(p)-pos)))
		e, err := q.l2Entry(gc)
		if err != nil {
			return 0, err
		}
		k, host, err := q.classify(e, gc)
		if err != nil {
			return 0, err
		}
		if k == kCompressed {
			if err := flush(); err != nil {
				return 0, err
			}
			data, err := q.readCompressed(e, gc)
			if err != nil {
				return 0, err
			}
			copy(p[pos:pos+n], data[in:])
			pos += n
			continue
		}
		if runLen > 0 && k == runKind && (k != kNormal || runHost+int64(runLen) == host+in) {
			runLen += n
		} else {
			if err := flush(); err != nil {
				return 0, err
			}
			runKind, runStart, runHost, runLen = k, pos, host+in, n
		}
		pos += n
	}
	if err := flush(); err != nil {
		return 0, err
	}
	if len(sealed) > 0 {
		q.crypt.decryptRuns(sealed)
	}
	if len(p) < len(want) {
		return len(p), io.EOF
	}
	return len(p), nil
}

// readBacking fills dst from the backing chain at guest offset off, with zeros
// where there is no backing or past its end.
func readBacking(b Image, dst []byte, off int64) error {
	if b == nil {
		clear(dst)
		return nil
	}
	bs := b.Size()
	if off >= bs {
		clear(dst)
		return nil
	}
	n := int(min(int64(len(dst)), bs-off))
	if _, err := b.ReadAt(dst[:n], off); err != nil && !(errors.Is(err, io.EOF)) {
		return fmt.Errorf("read backing %s: %w", b.Info().Path, err)
	}
	clear(dst[n:])
	return nil
}

// isZero reports whether b is all zeros.
func isZero(b []byte) bool {
	for len(b) >= 8 {
		if binary.LittleEndian.Uint64(b) != 0 {
			return false
		}
		b = b[8:]
	}
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}

// encrypted reports whether the layer's data clusters are encrypted.
func (q *Qcow2) encrypted() bool { return q.h.cryptMethod == cryptLUKS }

// readData reads data cluster bytes at host offset off, decrypted.
func (q *Qcow2) readData(dst []byte, off int64) (int, error) {
	if !q.encrypted() {
		return q.f.ReadAt(dst, off)
	}
	if q.crypt == nil {
		return 0, fmt.Errorf("%s: %w", q.path, ErrKeyRequired)
	}
	if len(dst) == 0 {
		return 0, nil
	}
	lo := off &^ (luksSector - 1)
	hi := (off + int64(len(dst)) + luksSector - 1) &^ (luksSector - 1)
	buf := dst
	if lo != off || hi != off+int64(len(dst)) {
		buf = make([]byte, hi-lo)
	}
	n, err := q.f.ReadAt(buf, lo)
	if err != nil {
		if !errors.Is(err, io.EOF) {
			return 0, err
		}
		clear(buf[n:]) // a cluster at the end of a file not fully written
	}
	q.crypt.crypt(buf, buf, uint64(lo/luksSector), true)
	if &buf[0] != &dst[0] {
		copy(dst, buf[off-lo:])
	}
	return len(dst), nil
}

// alignedBuf is an n-byte buffer aligned for O_DIRECT.
func alignedBuf(n int) []byte {
	b := make([]byte, n+directAlign)
	a := int(uintptr(unsafe.Pointer(unsafe.SliceData(b))) % directAlign)
	if a != 0 {
		a = directAlign - a
	}
	return b[a : a+n : a+n]
}

// directAlign is the alignment O_DIRECT asks of buffers, offsets and lengths
// (the largest logical block size in use).
const directAlign = 4096

// writeData writes guest data at host offset off: through the O_DIRECT
// descriptor when there is one and b and off are aligned for it, else through
// the page cache.
func (q *Qcow2) writeData(b []byte, off int64) error {
	if q.encrypted() {
		if q.crypt == nil {
			return fmt.Errorf("%s: %w", q.path, ErrKeyRequired)
		}
		if off%luksSector != 0 || len(b)%luksSector != 0 {
			return fmt.Errorf("internal: encrypted write of %d bytes at %#x is not sector-aligned", len(b), off)
		}
		enc := alignedBuf(len(b))
		q.crypt.crypt(enc, b, uint64(off/luksSector), false)
		b = enc
	}
	if q.direct != nil && len(b) > 0 && off%directAlign == 0 && len(b)%directAlign == 0 &&
		uintptr(unsafe.Pointer(unsafe.SliceData(b)))%directAlign == 0 {
		if _, err := q.direct.WriteAt(b, off); err == nil {
			q.directWrites++
			return nil
		}
		// Some file systems refuse a direct write they accepted the open of:
		// write it through the page cache, and stop trying.
		q.closeDirect()
	}
	_, err := q.f.WriteAt(b, off)
	return err
}

func (q *Qcow2) closeDirect() {
	if q.direct != nil {
		q.direct.Close()
		q.direct = nil
	}
}
