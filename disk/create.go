package disk

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
)

// Create makes a new qcow2 v3 image at path (which must not exist) and returns it
// opened read-write with its backing chain. The backing file name is stored
// relative to the new image's directory when it can be, always with the
// backing-format extension. When opts.Size and opts.BackingFormat are both given,
// the backing file is not opened before the image is written.
func Create(path string, opts CreateOptions) (Image, error) {
	if err := CreateFile(path, opts); err != nil {
		return nil, err
	}
	roots := opts.AllowedRoots
	if len(roots) == 0 && opts.BackingFile != "" {
		roots = []string{filepath.Dir(path), filepath.Dir(absOrSelf(opts.BackingFile))}
	}
	keys := opts.Keys
	if opts.Encrypt != nil {
		self, err := filepath.Abs(path)
		if err != nil {
			return nil, err
		}
		below := keysOr(opts.Keys)
		keys = func(p string) ([][]byte, error) {
			if p == self {
				return [][]byte{opts.Encrypt.Key}, nil
			}
			if below != nil {
				return below(p)
			}
			return nil, nil
		}
	}
	img, err := Open(path, OpenOptions{AllowedRoots: roots, Keys: keys})
	if err != nil {
		return nil, fmt.Errorf("open new image: %w", err)
	}
	return img, nil
}

func absOrSelf(p string) string {
	if a, err := filepath.Abs(p); err == nil {
		return a
	}
	return p
}

// CreateFile is Create without opening the result: it writes and syncs the new
// image and returns. Bulk cloning uses it.
func CreateFile(path string, opts CreateOptions) error {
	cs := opts.ClusterSize
	if cs == 0 {
		cs = DefaultClusterSize
	}
	cb := log2(cs)
	if cb < minClusterBits || cb > maxClusterBits {
		return fmt.Errorf("cluster size %d: must be a power of two from 512 to 2 MiB", cs)
	}
	// Like QEMU, virtual sizes are whole 512-byte sectors.
	h := &header{version: 3, clusterBits: uint32(cb), refcountOrder: 4, headerLen: v3HeaderLen, size: uint64(opts.Size+511) &^ 511}
	switch opts.Compression {
	case "", "deflate", "zlib":
	case "zstd":
		h.incompat |= incompatCompression
		h.compressionType = compressionZstd
	default:
		return fmt.Errorf("compression type %q: want deflate or zstd", opts.Compression)
	}
	if opts.BackingFile != "" {
		babs := absOrSelf(opts.BackingFile)
		bfmt := opts.BackingFormat
		if opts.Size == 0 || bfmt == "" {
			roots := opts.AllowedRoots
			if len(roots) == 0 {
				roots = []string{filepath.Dir(babs)}
			}
			b, err := Open(babs, OpenOptions{ReadOnly: true, AllowedRoots: roots, Keys: opts.Keys})
			if err != nil {
				return fmt.Errorf("backing file: %w", err)
			}
			if bfmt == "" {
				bfmt = b.Info().Format
			}
			if opts.Size == 0 {
				h.size = uint64(b.Size()+511) &^ 511
			}
			b.Close()
		}
		name := babs
		if dir, err := filepath.Abs(filepath.Dir(path)); err == nil {
			if rel, err := filepath.Rel(dir, babs); err == nil {
				name = rel
			}
		}
		h.backingName, h.backingFormat = name, string(bfmt)
	}
	if h.size == 0 && opts.Size == 0 && opts.BackingFile == "" {
		return errors.New("create: size is required without a backing file")
	}
	if opts.Size < 0 || h.size > maxVirtualSize {
		return fmt.Errorf("create: size %d out of range", opts.Size)
	}
	var luks []byte
	if opts.Encrypt != nil {
		if h.compressionType != compressionDeflate {
			return errors.New("create: encryption and zstd compression: QEMU does not compress encrypted images")
		}
		region, _, err := newLUKS(opts.Encrypt)
		if err != nil {
			return fmt.Errorf("create: %w", err)
		}
		luks = region
		h.cryptMethod, h.cryptLength = cryptLUKS, uint64(len(region))
	}
	buf, err := layout(h, cs)
	if err != nil {
		return err
	}
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o644)
	if err != nil {
		return err
	}
	fail := func(err error) error {
		f.Close()
		os.Remove(path)
		return fmt.Errorf("create %s: %w", path, err)
	}
	if _, err := f.WriteAt(buf.meta, 0); err != nil {
		return fail(err)
	}
	if luks != nil {
		if _, err := f.WriteAt(luks, int64(h.cryptOffset)); err != nil {
			return fail(err)
		}
	}
	if err := f.Truncate(buf.fileSize); err != nil {
		return fail(err)
	}
	if err := f.Sync(); err != nil {
		return fail(err)
	}
	return f.Close()
}

type newLayout struct {
	meta     []byte // header, refcount table and blocks (the L1 table is zeros)
	fileSize int64
}

// layout places header (cluster 0), refcount table, refcount blocks, the L1
// table and the LUKS header (h.cryptLength bytes, when encrypted), and fills the
// refcounts of all of them.
func layout(h *header, cs int) (*newLayout, error) {
	cb := uint(h.clusterBits)
	l1Entries := l1Needed(h.size, h.clusterBits)
	if l1Entries*8 > maxL1Bytes {
		return nil, fmt.Errorf("create: a %d-byte disk needs an L1 table over %d bytes; use a larger cluster size", h.size, maxL1Bytes)
	}
	clusters := func(b int64) int64 { return (b + int64(cs) - 1) >> cb }
	l1Clusters := max(1, clusters(int64(l1Entries)*8))
	cryptClusters := clusters(int64(h.cryptLength))
	rpb := int64(cs) * 8 / 16 // 16-bit refcounts
	var rt, rb int64 = 1, 1
	for {
		total := 1 + rt + rb + l1Clusters + cryptClusters
		nrb := (total + rpb - 1) / rpb
		nrt := max(1, clusters(nrb*8))
		if nrb == rb && nrt == rt {
			break
		}
		rb, rt = nrb, nrt
	}
	total := 1 + rt + rb + l1Clusters + cryptClusters
	if cryptClusters > 0 {
		h.cryptOffset = uint64((1 + rt + rb + l1Clusters) * int64(cs))
	}
	h.refTableOffset = uint64(cs)
	h.refTableClusters = uint32(rt)
	h.l1Offset = uint64((1 + rt + rb) * int64(cs))
	h.l1Size = uint32(l1Entries)
	hdr, err := h.encode(cs)
	if err != nil {
		return nil, err
	}
	meta := make([]byte, (1+rt+rb)*int64(cs))
	copy(meta, hdr)
	for i := int64(0); i < rb; i++ {
		binary.BigEndian.PutUint64(meta[int64(cs)+i*8:], uint64((1+rt+i)*int64(cs)))
	}
	rbBase := (1 + rt) * int64(cs)
	for ci := int64(0); ci < total; ci++ {
		binary.BigEndian.PutUint16(meta[rbBase+ci*2:], 1)
	}
	return &newLayout{meta: meta, fileSize: total * int64(cs)}, nil
}
