package disk

import (
	"errors"
	"fmt"
	"io"
)

// Format names an image format.
type Format string

// Formats cvd reads and writes.
const (
	FormatQcow2 Format = "qcow2"
	FormatRaw   Format = "raw"
)

// DefaultClusterSize is the cluster size Create uses when none is given.
const DefaultClusterSize = 64 << 10

// DefaultMaxDepth is the longest backing chain Open follows when none is given.
const DefaultMaxDepth = 64

// Image is one opened layer of a disk together with its backing chain. ReadAt reads
// the guest view of the whole chain; writes go to this layer only.
type Image interface {
	io.ReaderAt
	io.WriterAt
	io.Closer // closes the whole chain below this layer too

	// Info describes this layer.
	Info() Info
	// Size is the virtual size in bytes.
	Size() int64
	// Backing is the next layer down, or nil.
	Backing() Image
	// MapLayer reports, for [off, off+n), what this layer alone holds, as
	// sorted, merged extents.
	MapLayer(off, n int64) ([]Extent, error)
	// WriteZeroes makes [off, off+n) read as zeros, without writing data where
	// the format allows (the v3 zero flag).
	WriteZeroes(off, n int64) error
	// Discard gives [off, off+n) back: afterwards it reads as zeros and holds no
	// host clusters where whole clusters are covered.
	Discard(off, n int64) error
	// Flush makes every completed write durable.
	Flush() error
}

// Info describes one layer.
type Info struct {
	Path          string // file path as opened (cleaned)
	Format        Format
	Version       int   // qcow2 version (2 or 3); 0 for raw
	Size          int64 // virtual size
	ClusterSize   int   // bytes; 512 for raw
	BackingName   string
	BackingFormat Format
	FileSize      int64 // bytes of the file on the host at open time or last flush
	ReadOnly      bool
	Compression   string // qcow2 compression type: "deflate" or "zstd"
	RefcountBits  int
	Snapshots     int  // internal snapshots in the image
	Bitmaps       bool // the image carries persistent bitmaps
	Encrypted     bool // qcow2 with LUKS encryption (crypt_method 2)
	Unlocked      bool // encrypted and opened with its key: data can be read and written
}

// State is what a guest range holds in one layer.
type State uint8

const (
	// Unallocated: the layer says nothing; reads fall through to the backing
	// file (or zeros past its end, or with no backing).
	Unallocated State = iota
	// Zero: the layer says "reads as zeros" without data.
	Zero
	// Data: the layer holds data for the range.
	Data
)

func (s State) String() string {
	switch s {
	case Unallocated:
		return "unallocated"
	case Zero:
		return "zero"
	case Data:
		return "data"
	}
	return "invalid"
}

// Extent is a guest range with one state in one layer.
type Extent struct {
	Off, Len   int64
	State      State
	HostOff    int64 // host offset of the first byte for uncompressed Data; -1 otherwise
	Compressed bool  // Data held as compressed clusters
}

// ChainExtent is a guest range and which layer of the chain serves it.
type ChainExtent struct {
	Off, Len int64
	// Depth is the layer that serves the range: 0 is the top, k is k steps down.
	// -1 means no layer allocates it (it reads as zeros).
	Depth int
	// Zero is true when the range reads as zeros (a zero extent, or nothing
	// allocated, or past the end of a shorter backing file).
	Zero bool
}

// OpenOptions controls Open.
type OpenOptions struct {
	// ReadOnly opens every layer read-only. Backing layers are always read-only.
	ReadOnly bool
	// Format of the top image; empty probes the file.
	Format Format
	// AllowedRoots are the directories backing files may resolve into. When
	// empty, the directory of the top image is the only root.
	AllowedRoots []string
	// MaxDepth bounds the chain length (top included); 0 means DefaultMaxDepth.
	MaxDepth int
	// NoBacking opens the top layer alone: reads of unallocated ranges return
	// zeros. For inspecting one layer (info, check).
	NoBacking bool
	// NoBarriers skips the fsyncs that order metadata updates. Only for a file
	// being built that is thrown away if the process crashes (a temporary file
	// renamed into place after Flush): a crash may leave it corrupt.
	NoBarriers bool
	// DirectData writes whole data clusters of the top layer through a second
	// descriptor opened with O_DIRECT, past the page cache; metadata and
	// anything unaligned go through the page cache as usual. For bulk writes of
	// data not read back soon (a layer being received): it spares allocating
	// and later flushing a page-cache copy. Where the file system refuses
	// O_DIRECT, writes go through the page cache.
	DirectData bool
	// Keys gives the passphrase of each encrypted layer of the chain. A layer
	// with no key opens locked: Info, MapLayer and Check work, reading or
	// writing its data fails with ErrKeyRequired. A wrong key fails the open
	// with ErrBadKey.
	Keys KeyFunc
}

// CreateOptions controls Create.
type CreateOptions struct {
	// Size is the virtual size in bytes. When zero and a backing file is given,
	// the backing file's size is used.
	Size int64
	// ClusterSize is a power of two from 512 B to 2 MiB; 0 means 64 KiB.
	ClusterSize int
	// BackingFile is the path of the backing image (absolute, or relative to the
	// current directory). It is stored relative to the new image's directory
	// when it can be, and the backing-format extension is always written.
	BackingFile string
	// BackingFormat of BackingFile; empty probes it.
	BackingFormat Format
	// Compression is the type recorded for compressed clusters: "" or "deflate"
	// (the default, no incompatible bit) or "zstd".
	Compression string
	// AllowedRoots is passed to Open when the backing chain is opened to check
	// it and to take its size. Empty means the backing file's own directory.
	AllowedRoots []string
	// Encrypt makes the image LUKS-encrypted; nil makes a plain one.
	Encrypt *Encryption
	// Keys unlocks encrypted layers of the backing chain (Create opens the
	// result with them).
	Keys KeyFunc
}

// Layers lists img's chain from the top (index 0) down.
func Layers(img Image) []Image {
	var out []Image
	for l := img; l != nil; l = l.Backing() {
		out = append(out, l)
	}
	return out
}

// ReadView fills p with the guest view of img at off: zeros past the end of the
// disk, or everywhere when img is nil (a chain that does not exist reads as
// zeros).
func ReadView(img Image, p []byte, off int64) error {
	if img == nil || off >= img.Size() {
		clear(p)
		return nil
	}
	n := min(int64(len(p)), img.Size()-off)
	if _, err := img.ReadAt(p[:n], off); err != nil && !errors.Is(err, io.EOF) {
		return fmt.Errorf("read %s at %d: %w", img.Info().Path, off, err)
	}
	clear(p[n:])
	return nil
}
