package disk

import (
	"encoding/binary"
	"fmt"
	"math/bits"
)

const (
	qcow2Magic = 0x514649fb // "QFI\xfb"

	v2HeaderLen = 72
	v3HeaderLen = 112 // with the compression-type byte and padding

	extEnd            = 0x00000000
	extBackingFormat  = 0xe2792aca
	extFeatureNames   = 0x6803f857
	extBitmaps        = 0x23852875
	extFullDiskCrypto = 0x0537be77
	extDataFile       = 0x44415441

	incompatDirty       = 1 << 0
	incompatCorrupt     = 1 << 1
	incompatDataFile    = 1 << 2
	incompatCompression = 1 << 3
	incompatExtendedL2  = 1 << 4
	incompatKnown       = incompatDirty | incompatCorrupt | incompatDataFile | incompatCompression | incompatExtendedL2

	compatLazyRefcounts = 1 << 0
	autoclearBitmaps    = 1 << 0

	compressionDeflate = 0
	compressionZstd    = 1

	minClusterBits = 9
	maxClusterBits = 21

	// Limits that protect against hostile images, the same as QEMU's.
	maxL1Bytes        = 32 << 20 // QCOW_MAX_L1_SIZE
	maxRefTableBytes  = 8 << 20  // QCOW_MAX_REFTABLE_SIZE
	maxBackingNameLen = 1023
	maxVirtualSize    = 1 << 55 // offsets are 56-bit in L2 entries
	maxSnapshots      = 65536

	l1OffsetMask   = 0x00fffffffffffe00
	l2OffsetMask   = 0x00fffffffffffe00
	oflagCopied    = 1 << 63
	oflagCompress  = 1 << 62
	oflagZero      = 1 << 0
	l1ReservedMask = 0x7f000000000001ff
	l2ReservedMask = 0x3f000000000001fe // standard entries
)

// header is the decoded qcow2 header with its extensions.
type header struct {
	version          uint32
	backingOffset    uint64
	backingSize      uint32
	clusterBits      uint32
	size             uint64
	cryptMethod      uint32
	l1Size           uint32
	l1Offset         uint64
	refTableOffset   uint64
	refTableClusters uint32
	nbSnapshots      uint32
	snapshotsOffset  uint64
	incompat         uint64
	compat           uint64
	autoclear        uint64
	refcountOrder    uint32
	headerLen        uint32
	compressionType  uint8

	backingName   string
	backingFormat string
	// cryptOffset and cryptLength place the LUKS header (crypt_method 2).
	cryptOffset, cryptLength uint64
	hasBitmapsExt            bool
	// unknown extensions are kept so that rewriting the header preserves them.
	otherExts []headerExt
}

type headerExt struct {
	typ  uint32
	data []byte
}

// parseHeader decodes and validates the header in buf (the first cluster of the
// file, or as much of it as the file has). fileSize bounds every offset.
func parseHeader(buf []byte, fileSize int64) (*header, error) {
	if len(buf) < v2HeaderLen {
		return nil, fmt.Errorf("%w: file too short for a qcow2 header (%d bytes)", ErrNotQcow2, len(buf))
	}
	be := binary.BigEndian
	if be.Uint32(buf[0:]) != qcow2Magic {
		return nil, ErrNotQcow2
	}
	h := &header{
		version:          be.Uint32(buf[4:]),
		backingOffset:    be.Uint64(buf[8:]),
		backingSize:      be.Uint32(buf[16:]),
		clusterBits:      be.Uint32(buf[20:]),
		size:             be.Uint64(buf[24:]),
		cryptMethod:      be.Uint32(buf[32:]),
		l1Size:           be.Uint32(buf[36:]),
		l1Offset:         be.Uint64(buf[40:]),
		refTableOffset:   be.Uint64(buf[48:]),
		refTableClusters: be.Uint32(buf[56:]),
		nbSnapshots:      be.Uint32(buf[60:]),
		snapshotsOffset:  be.Uint64(buf[64:]),
		refcountOrder:    4,
		headerLen:        v2HeaderLen,
	}
	switch h.version {
	case 2:
	case 3:
		if len(buf) < 104 {
			return nil, formatErr(0, "header", "v3 header truncated")
		}
		h.incompat = be.Uint64(buf[72:])
		h.compat = be.Uint64(buf[80:])
		h.autoclear = be.Uint64(buf[88:])
		h.refcountOrder = be.Uint32(buf[96:])
		h.headerLen = be.Uint32(buf[100:])
		if h.headerLen < 104 || h.headerLen%8 != 0 {
			return nil, formatErr(100, "header_length", "%d is not a multiple of 8 of at least 104", h.headerLen)
		}
		if h.headerLen > 104 && len(buf) > 104 {
			h.compressionType = buf[104]
		}
	case 1:
		return nil, fmt.Errorf("%w: qcow version 1 (use qemu-img convert to upgrade it)", ErrUnsupported)
	default:
		return nil, formatErr(4, "version", "unknown version %d", h.version)
	}
	if h.clusterBits < minClusterBits || h.clusterBits > maxClusterBits {
		return nil, formatErr(20, "cluster_bits", "%d out of range %d..%d", h.clusterBits, minClusterBits, maxClusterBits)
	}
	cs := uint64(1) << h.clusterBits
	if uint64(h.headerLen) > cs || int(h.headerLen) > len(buf) {
		return nil, formatErr(100, "header_length", "%d does not fit in the first cluster", h.headerLen)
	}
	if h.size > maxVirtualSize {
		return nil, formatErr(24, "size", "virtual size %d too large", h.size)
	}
	if h.refcountOrder > 6 {
		return nil, formatErr(96, "refcount_order", "%d out of range 0..6", h.refcountOrder)
	}
	if unknown := h.incompat &^ incompatKnown; unknown != 0 {
		return nil, fmt.Errorf("%w: unknown incompatible feature bits %#x", ErrUnsupported, unknown)
	}
	if h.incompat&incompatCorrupt != 0 {
		return nil, formatErr(72, "incompatible_features", "image is marked corrupt")
	}
	if h.incompat&incompatDataFile != 0 {
		return nil, fmt.Errorf("%w: external data file", ErrUnsupported)
	}
	if h.incompat&incompatExtendedL2 != 0 {
		return nil, fmt.Errorf("%w: extended L2 entries (subclusters)", ErrUnsupported)
	}
	if h.incompat&incompatCompression != 0 {
		if h.headerLen <= 104 {
			return nil, formatErr(100, "header_length", "compression type bit set but header has no compression type field")
		}
		if h.compressionType != compressionZstd && h.compressionType != compressionDeflate {
			return nil, fmt.Errorf("%w: compression type %d", ErrUnsupported, h.compressionType)
		}
	} else if h.compressionType != compressionDeflate {
		return nil, formatErr(104, "compression_type", "non-deflate type %d without the incompatible bit", h.compressionType)
	}
	switch h.cryptMethod {
	case cryptNone, cryptLUKS:
	case cryptAES:
		return nil, fmt.Errorf("%w: legacy qcow AES encryption (crypt_method 1); convert it to LUKS with qemu-img convert", ErrUnsupported)
	default:
		return nil, formatErr(32, "crypt_method", "unknown method %d", h.cryptMethod)
	}

	// Tables must be aligned and inside the file.
	if err := checkTable(h.l1Offset, uint64(h.l1Size)*8, cs, fileSize, 40, "l1_table_offset", maxL1Bytes); err != nil {
		return nil, err
	}
	need := l1Needed(h.size, h.clusterBits)
	if uint64(h.l1Size) < need {
		return nil, formatErr(36, "l1_size", "%d entries cannot cover a virtual size of %d (need %d)", h.l1Size, h.size, need)
	}
	if h.refTableClusters == 0 {
		return nil, formatErr(56, "refcount_table_clusters", "is zero")
	}
	if err := checkTable(h.refTableOffset, uint64(h.refTableClusters)*cs, cs, fileSize, 48, "refcount_table_offset", maxRefTableBytes); err != nil {
		return nil, err
	}
	if h.nbSnapshots > maxSnapshots {
		return nil, formatErr(60, "nb_snapshots", "%d too many", h.nbSnapshots)
	}
	if h.nbSnapshots > 0 {
		if h.snapshotsOffset%cs != 0 || h.snapshotsOffset == 0 || h.snapshotsOffset >= uint64(fileSize) {
			return nil, formatErr(64, "snapshots_offset", "%#x not an aligned offset inside the file", h.snapshotsOffset)
		}
	}

	// Header extensions live between the header and the end of cluster 0.
	end := min(uint64(len(buf)), cs)
	off := uint64(h.headerLen)
	if h.version == 2 {
		off = v2HeaderLen
	}
	for {
		if off+8 > end {
			// v2 images may have no extension area at all.
			if h.version == 2 {
				break
			}
			return nil, formatErr(int64(off), "header extension", "extension area runs past the first cluster")
		}
		typ := be.Uint32(buf[off:])
		l := uint64(be.Uint32(buf[off+4:]))
		if typ == extEnd {
			break
		}
		dataOff := off + 8
		if l > end-dataOff {
			return nil, formatErr(int64(off), "header extension", "type %#x length %d runs past the first cluster", typ, l)
		}
		data := buf[dataOff : dataOff+l]
		switch typ {
		case extBackingFormat:
			h.backingFormat = string(data)
		case extBitmaps:
			h.hasBitmapsExt = true
			h.otherExts = append(h.otherExts, headerExt{typ, append([]byte(nil), data...)})
		case extFullDiskCrypto:
			if l != 16 {
				return nil, formatErr(int64(off), "full disk encryption header extension", "length %d, want 16", l)
			}
			h.cryptOffset, h.cryptLength = be.Uint64(data), be.Uint64(data[8:])
		case extDataFile:
			return nil, fmt.Errorf("%w: external data file", ErrUnsupported)
		case extFeatureNames:
			// Regenerated on write.
		default:
			h.otherExts = append(h.otherExts, headerExt{typ, append([]byte(nil), data...)})
		}
		off = dataOff + (l+7)&^7
	}

	if h.backingOffset != 0 {
		if h.backingSize == 0 || h.backingSize > maxBackingNameLen {
			return nil, formatErr(16, "backing_file_size", "%d out of range 1..%d", h.backingSize, maxBackingNameLen)
		}
		if h.backingOffset >= end || uint64(h.backingSize) > end-h.backingOffset {
			return nil, formatErr(8, "backing_file_offset", "name at %#x+%d lies outside the first cluster", h.backingOffset, h.backingSize)
		}
		h.backingName = string(buf[h.backingOffset : h.backingOffset+uint64(h.backingSize)])
	}
	if h.backingName == "" && h.backingFormat != "" {
		h.backingFormat = ""
	}
	if h.cryptMethod == cryptLUKS {
		if h.cryptLength == 0 {
			return nil, formatErr(32, "crypt_method", "LUKS encryption without the full disk encryption header extension")
		}
		if h.cryptLength < luksPhdrLen || h.cryptLength > luksMaxRegion {
			return nil, formatErr(-1, "full disk encryption header extension", "LUKS header length %d out of range %d..%d", h.cryptLength, luksPhdrLen, luksMaxRegion)
		}
		if err := checkTable(h.cryptOffset, h.cryptLength, cs, fileSize, -1, "LUKS header offset", luksMaxRegion); err != nil {
			return nil, err
		}
	} else if h.cryptLength != 0 {
		return nil, formatErr(32, "crypt_method", "full disk encryption header extension on an unencrypted image")
	}
	return h, nil
}

// checkTable validates an on-disk table: aligned, non-empty start, bounded size,
// inside the file.
func checkTable(off, length, cs uint64, fileSize int64, fieldOff int64, field string, maxLen uint64) error {
	if length > maxLen {
		return formatErr(fieldOff, field, "table of %d bytes exceeds the limit of %d", length, maxLen)
	}
	if length == 0 {
		return nil
	}
	if off == 0 || off%cs != 0 {
		return formatErr(fieldOff, field, "%#x is not a cluster-aligned offset", off)
	}
	if off > uint64(fileSize) || length > uint64(fileSize)-off {
		return formatErr(fieldOff, field, "table at %#x+%d runs past the end of the file (%d bytes)", off, length, fileSize)
	}
	return nil
}

// l1Needed is the number of L1 entries a virtual size needs.
func l1Needed(size uint64, clusterBits uint32) uint64 {
	l2Bits := clusterBits - 3
	shift := clusterBits + l2Bits
	return (size + (1 << shift) - 1) >> shift
}

// encode writes the header and its extensions into a buffer of one cluster
// (or less, when the cluster is larger than needed). It fails if the header,
// extensions and backing name do not fit in the first cluster.
func (h *header) encode(cs int) ([]byte, error) {
	be := binary.BigEndian
	hl := uint32(v3HeaderLen)
	if h.version == 2 {
		hl = v2HeaderLen
	}
	var exts []byte
	addExt := func(typ uint32, data []byte) {
		var hd [8]byte
		be.PutUint32(hd[0:], typ)
		be.PutUint32(hd[4:], uint32(len(data)))
		exts = append(exts, hd[:]...)
		exts = append(exts, data...)
		for len(exts)%8 != 0 {
			exts = append(exts, 0)
		}
	}
	if h.backingName != "" && h.backingFormat != "" {
		addExt(extBackingFormat, []byte(h.backingFormat))
	}
	if h.cryptMethod == cryptLUKS {
		var d [16]byte
		be.PutUint64(d[0:], h.cryptOffset)
		be.PutUint64(d[8:], h.cryptLength)
		addExt(extFullDiskCrypto, d[:])
	}
	for _, e := range h.otherExts {
		addExt(e.typ, e.data)
	}
	// The feature-name table is only informative: leave it out of small clusters.
	if fnt := featureNameTable(); h.version == 3 && int(hl)+len(exts)+8+len(fnt)+8+len(h.backingName) <= cs {
		addExt(extFeatureNames, fnt)
	}
	exts = append(exts, make([]byte, 8)...) // end marker
	total := int(hl) + len(exts)
	h.backingOffset, h.backingSize = 0, 0
	if h.backingName != "" {
		if len(h.backingName) > maxBackingNameLen {
			return nil, fmt.Errorf("backing file name longer than %d bytes", maxBackingNameLen)
		}
		h.backingOffset = uint64(total)
		h.backingSize = uint32(len(h.backingName))
		total += len(h.backingName)
	}
	if total > cs {
		return nil, fmt.Errorf("header, extensions and backing name (%d bytes) do not fit in a %d-byte cluster", total, cs)
	}
	buf := make([]byte, total)
	be.PutUint32(buf[0:], qcow2Magic)
	be.PutUint32(buf[4:], h.version)
	be.PutUint64(buf[8:], h.backingOffset)
	be.PutUint32(buf[16:], h.backingSize)
	be.PutUint32(buf[20:], h.clusterBits)
	be.PutUint64(buf[24:], h.size)
	be.PutUint32(buf[32:], h.cryptMethod)
	be.PutUint32(buf[36:], h.l1Size)
	be.PutUint64(buf[40:], h.l1Offset)
	be.PutUint64(buf[48:], h.refTableOffset)
	be.PutUint32(buf[56:], h.refTableClusters)
	be.PutUint32(buf[60:], h.nbSnapshots)
	be.PutUint64(buf[64:], h.snapshotsOffset)
	if h.version == 3 {
		be.PutUint64(buf[72:], h.incompat)
		be.PutUint64(buf[80:], h.compat)
		be.PutUint64(buf[88:], h.autoclear)
		be.PutUint32(buf[96:], h.refcountOrder)
		be.PutUint32(buf[100:], hl)
		buf[104] = h.compressionType
		h.headerLen = hl
	}
	copy(buf[hl:], exts)
	copy(buf[h.backingOffset:], h.backingName)
	return buf, nil
}

// featureNameTable is the feature-name extension QEMU writes, so that tools can
// name the bits.
func featureNameTable() []byte {
	type fn struct {
		typ, bit byte
		name     string
	}
	names := []fn{
		{0, 0, "dirty bit"}, {0, 1, "corrupt bit"}, {0, 2, "external data file"},
		{0, 3, "compression type"}, {0, 4, "extended L2 entries"},
		{1, 0, "lazy refcounts"}, {2, 0, "bitmaps"}, {2, 1, "raw external data"},
	}
	out := make([]byte, 0, 48*len(names))
	for _, n := range names {
		var e [48]byte
		e[0], e[1] = n.typ, n.bit
		copy(e[2:], n.name)
		out = append(out, e[:]...)
	}
	return out
}

// log2 of a power of two, or -1.
func log2(n int) int {
	if n <= 0 || n&(n-1) != 0 {
		return -1
	}
	return bits.TrailingZeros(uint(n))
}
