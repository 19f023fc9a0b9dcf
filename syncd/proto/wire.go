package proto

import (
	"bufio"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"sync"
	"sync/atomic"

	"github.com/klauspost/compress/zstd"
)

// The cluster stream: what GET /v1/layers/{id}/clusters answers and what
// POST /v1/checkins/{sid}/clusters sends. After the 8-byte magic come frames, each a
// 24-byte big-endian header and a body:
//
//	0      kind   'D' one data cluster, 'Z' a run of zero clusters, 'E' end
//	1      enc    D: 0 raw, 1 zstd
//	2      disk   check-in uploads: the disk number; 0 otherwise
//	3      0
//	4:8    plen   D: bytes of encoded data; E: 32; Z: 0
//	8:16   idx    D, Z: the first guest cluster index; E: the number of entries
//	16:24  n      D: raw length (the cluster size, less for a last partial one);
//	              Z: clusters in the run; E: 0
//
// A D body is the SHA-256 of the raw cluster (32 bytes) and plen bytes of data; an E
// body is the ID the entries hash to (32 raw bytes; zero in uploads). A stream
// without its E frame is truncated.
//
// In a layer stream asked for with the lease of a check-out that listed the layers
// the laptop holds, a data cluster that one of those layers holds too comes as an
// R frame instead (kind 'R', plen 72, n the raw length): its SHA-256, the holding
// layer's ID (32 raw bytes) and the cluster's index there (8 bytes). The laptop
// reads it from its own copy of that layer and checks the digest.
const (
	streamMagic = "CVDSTRM1"
	FrameHeader = 24

	KindData = 'D'
	KindZero = 'Z'
	KindEnd  = 'E'
	KindRef  = 'R'

	RefBody = sha256.Size + sha256.Size + 8

	encRaw  = 0
	encZstd = 1

	// MaxClusterSize bounds what a frame may carry (qcow2's largest cluster).
	MaxClusterSize = 2 << 20
	// probeSize is the sample compressed first to spot incompressible data.
	probeSize = 4 << 10
)

// ErrStream marks a malformed or truncated cluster stream.
var ErrStream = errors.New("malformed cluster stream")

// Frame is one decoded Frame header.
type Frame struct {
	Kind byte
	Enc  byte
	Disk byte
	PLen uint32
	Idx  int64
	N    int64
}

func (f *Frame) Put(b []byte) {
	b[0], b[1], b[2], b[3] = f.Kind, f.Enc, f.Disk, 0
	binary.BigEndian.PutUint32(b[4:8], f.PLen)
	binary.BigEndian.PutUint64(b[8:16], uint64(f.Idx))
	binary.BigEndian.PutUint64(b[16:24], uint64(f.N))
}

func parseFrame(b []byte) (Frame, error) {
	f := Frame{Kind: b[0], Enc: b[1], Disk: b[2], PLen: binary.BigEndian.Uint32(b[4:8]),
		Idx: int64(binary.BigEndian.Uint64(b[8:16])), N: int64(binary.BigEndian.Uint64(b[16:24]))}
	if b[3] != 0 {
		return f, fmt.Errorf("%w: reserved byte %#x", ErrStream, b[3])
	}
	switch f.Kind {
	case KindData:
		if f.Enc != encRaw && f.Enc != encZstd {
			return f, fmt.Errorf("%w: unknown encoding %d", ErrStream, f.Enc)
		}
		if f.N <= 0 || f.N > MaxClusterSize || int64(f.PLen) > f.N || f.PLen == 0 {
			return f, fmt.Errorf("%w: data frame of %d bytes (%d encoded)", ErrStream, f.N, f.PLen)
		}
		if f.Enc == encRaw && int64(f.PLen) != f.N {
			return f, fmt.Errorf("%w: raw frame of %d bytes carries %d", ErrStream, f.N, f.PLen)
		}
	case KindZero:
		if f.PLen != 0 || f.N <= 0 {
			return f, fmt.Errorf("%w: zero run of %d clusters", ErrStream, f.N)
		}
	case KindEnd:
		if f.PLen != sha256.Size {
			return f, fmt.Errorf("%w: end frame", ErrStream)
		}
	case KindRef:
		if f.PLen != RefBody || f.N <= 0 || f.N > MaxClusterSize {
			return f, fmt.Errorf("%w: reference frame of %d bytes", ErrStream, f.N)
		}
	default:
		return f, fmt.Errorf("%w: unknown frame kind %#x", ErrStream, f.Kind)
	}
	if f.Idx < 0 || f.N < 0 {
		return f, fmt.Errorf("%w: negative index", ErrStream)
	}
	return f, nil
}

// codec holds the zstd encoder and decoder every stream shares; both are safe for
// concurrent use through EncodeAll and DecodeAll.
type codec struct {
	once sync.Once
	enc  *zstd.Encoder
	dec  *zstd.Decoder
	err  error
}

var zc codec

func (c *codec) init() error {
	c.once.Do(func() {
		c.enc, c.err = zstd.NewWriter(nil, zstd.WithEncoderLevel(zstd.SpeedFastest),
			zstd.WithEncoderConcurrency(1), zstd.WithLowerEncoderMem(true))
		if c.err != nil {
			return
		}
		c.dec, c.err = zstd.NewReader(nil, zstd.WithDecoderConcurrency(0),
			zstd.WithDecoderMaxMemory(MaxClusterSize), zstd.WithDecoderMaxWindow(MaxClusterSize))
	})
	return c.err
}

// EncodedCluster is a data cluster ready to send.
type EncodedCluster struct {
	Disk   byte
	Idx    int64
	Digest Digest
	Raw    int
	Enc    byte
	Data   []byte      // encoded (or raw) bytes
	Ref    *ClusterRef // sent as a reference to a layer the receiver holds
}

// EncodeOptions says how clusters are encoded.
type EncodeOptions struct {
	Compress bool
	// Known, when set, is the cluster's digest, computed by the caller from the
	// same bytes (the receiver checks it again): the cluster is not hashed again.
	Known *Digest
	// RefOf, when set, names a layer the receiver holds with the same cluster.
	RefOf func(Digest) (ClusterRef, bool)
}

// EncodeCluster hashes and compresses one cluster; dst is reused when large enough.
// Data that does not shrink, or compress false, is sent raw: then the encoded
// data is raw itself, not a copy.
func EncodeCluster(diskNo byte, idx int64, raw []byte, dst []byte, opts EncodeOptions) (EncodedCluster, error) {
	ec := EncodedCluster{Disk: diskNo, Idx: idx, Raw: len(raw)}
	if opts.Known != nil {
		ec.Digest = *opts.Known
	} else {
		ec.Digest = sha256.Sum256(raw)
	}
	if opts.RefOf != nil {
		if ref, ok := opts.RefOf(ec.Digest); ok {
			ec.Ref = &ref
			return ec, nil
		}
	}
	if !opts.Compress {
		ec.Enc, ec.Data = encRaw, raw
		return ec, nil
	}
	if err := zc.init(); err != nil {
		return EncodedCluster{}, err
	}
	if len(raw) >= 4*probeSize {
		// A sample that does not shrink says the cluster is random-like
		// (encrypted, already compressed): send it raw without paying for a
		// full compression attempt.
		if p := zc.enc.EncodeAll(raw[:probeSize], dst[:0]); len(p) > probeSize*31/32 {
			ec.Enc, ec.Data = encRaw, raw
			return ec, nil
		}
	}
	out := zc.enc.EncodeAll(raw, dst[:0])
	if len(out) < len(raw) {
		ec.Enc, ec.Data = encZstd, out
	} else {
		ec.Enc, ec.Data = encRaw, raw
	}
	return ec, nil
}

// DecodeCluster decodes one data frame's payload into dst (len n) and checks it
// against the digest. A raw frame's cluster is payload itself, not a copy.
func DecodeCluster(f Frame, digest Digest, payload, dst []byte) ([]byte, error) {
	if err := zc.init(); err != nil {
		return nil, err
	}
	var raw []byte
	if f.Enc == encRaw {
		raw = payload
	} else {
		out, err := zc.dec.DecodeAll(payload, dst[:0])
		if err != nil {
			return nil, fmt.Errorf("%w: cluster %d: zstd: %v", ErrStream, f.Idx, err)
		}
		raw = out
	}
	if int64(len(raw)) != f.N {
		return nil, fmt.Errorf("%w: cluster %d decodes to %d bytes, header says %d", ErrStream, f.Idx, len(raw), f.N)
	}
	if sha256.Sum256(raw) != digest {
		return nil, fmt.Errorf("%w: cluster %d", ErrDigestMismatch, f.Idx)
	}
	return raw, nil
}

// StreamWriter writes a cluster stream and counts its bytes.
type StreamWriter struct {
	w     *bufio.Writer
	hdr   [FrameHeader]byte
	Bytes int64
	err   error
}

func NewStreamWriter(w io.Writer) *StreamWriter {
	sw := &StreamWriter{w: bufio.NewWriterSize(w, 256<<10)}
	sw.WriteRaw([]byte(streamMagic))
	return sw
}

func (sw *StreamWriter) WriteRaw(b []byte) {
	if sw.err != nil {
		return
	}
	n, err := sw.w.Write(b)
	sw.Bytes += int64(n)
	sw.err = err
}

func (sw *StreamWriter) Data(c EncodedCluster) error {
	f := Frame{Kind: KindData, Enc: c.Enc, Disk: c.Disk, PLen: uint32(len(c.Data)), Idx: c.Idx, N: int64(c.Raw)}
	f.Put(sw.hdr[:])
	sw.WriteRaw(sw.hdr[:])
	sw.WriteRaw(c.Digest[:])
	sw.WriteRaw(c.Data)
	return sw.err
}

func (sw *StreamWriter) Reference(c EncodedCluster) error {
	f := Frame{Kind: KindRef, Disk: c.Disk, PLen: RefBody, Idx: c.Idx, N: int64(c.Raw)}
	f.Put(sw.hdr[:])
	sw.WriteRaw(sw.hdr[:])
	sw.WriteRaw(c.Digest[:])
	id, err := HexID(c.Ref.Layer)
	if err != nil {
		return err
	}
	sw.WriteRaw(id)
	sw.WriteRaw(binary.BigEndian.AppendUint64(nil, uint64(c.Ref.Index)))
	return sw.err
}

func (sw *StreamWriter) Zeros(diskNo byte, idx, n int64) error {
	f := Frame{Kind: KindZero, Disk: diskNo, Idx: idx, N: n}
	f.Put(sw.hdr[:])
	sw.WriteRaw(sw.hdr[:])
	return sw.err
}

func (sw *StreamWriter) End(entries int64, id []byte) error {
	f := Frame{Kind: KindEnd, PLen: sha256.Size, Idx: entries}
	f.Put(sw.hdr[:])
	sw.WriteRaw(sw.hdr[:])
	var b [sha256.Size]byte
	copy(b[:], id)
	sw.WriteRaw(b[:])
	return sw.Flush()
}

func (sw *StreamWriter) Flush() error {
	if sw.err == nil {
		sw.err = sw.w.Flush()
	}
	return sw.err
}

// StreamReader reads a cluster stream.
type StreamReader struct {
	r     *bufio.Reader
	hdr   [FrameHeader]byte
	n     atomic.Int64 // bytes read (decodeOrdered reads on a goroutine of its own)
	magic bool
}

// Bytes is how many Bytes of the stream were read so far.
func (sr *StreamReader) Bytes() int64 { return sr.n.Load() }

func NewStreamReader(r io.Reader) *StreamReader {
	// A small buffer: payloads larger than it are read straight into their own
	// buffers instead of being copied out of it.
	return &StreamReader{r: bufio.NewReaderSize(r, 16<<10)}
}

func (sr *StreamReader) full(b []byte) error {
	n, err := io.ReadFull(sr.r, b)
	sr.n.Add(int64(n))
	if err == io.EOF || err == io.ErrUnexpectedEOF {
		return fmt.Errorf("%w: truncated", ErrStream)
	}
	return err
}

// Next reads the Next frame header and, for a data frame, its digest and payload
// (payload is reused between calls).
func (sr *StreamReader) Next(payload []byte) (Frame, Digest, []byte, error) {
	var d Digest
	if !sr.magic {
		var m [len(streamMagic)]byte
		if err := sr.full(m[:]); err != nil {
			return Frame{}, d, nil, err
		}
		if string(m[:]) != streamMagic {
			return Frame{}, d, nil, fmt.Errorf("%w: bad magic", ErrStream)
		}
		sr.magic = true
	}
	if err := sr.full(sr.hdr[:]); err != nil {
		return Frame{}, d, nil, err
	}
	f, err := parseFrame(sr.hdr[:])
	if err != nil {
		return f, d, nil, err
	}
	switch f.Kind {
	case KindData, KindRef:
		if err := sr.full(d[:]); err != nil {
			return f, d, nil, err
		}
		if f.Kind == KindRef {
			f.PLen -= sha256.Size // what follows the digest
		}
		if cap(payload) < int(f.PLen) {
			payload = make([]byte, f.PLen)
		}
		payload = payload[:f.PLen]
		if err := sr.full(payload); err != nil {
			return f, d, nil, err
		}
		return f, d, payload, nil
	case KindEnd:
		if err := sr.full(d[:]); err != nil {
			return f, d, nil, err
		}
	}
	return f, d, nil, nil
}
