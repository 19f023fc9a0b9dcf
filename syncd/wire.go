package syncd

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
	frameHeader = 24

	kindData = 'D'
	kindZero = 'Z'
	kindEnd  = 'E'
	kindRef  = 'R'

	refBody = sha256.Size + sha256.Size + 8

	encRaw  = 0
	encZstd = 1

	// maxClusterSize bounds what a frame may carry (qcow2's largest cluster).
	maxClusterSize = 2 << 20
	// probeSize is the sample compressed first to spot incompressible data.
	probeSize = 4 << 10
)

// ErrStream marks a malformed or truncated cluster stream.
var errStream = errors.New("malformed cluster stream")

// frame is one decoded frame header.
type frame struct {
	kind byte
	enc  byte
	disk byte
	plen uint32
	idx  int64
	n    int64
}

func (f *frame) put(b []byte) {
	b[0], b[1], b[2], b[3] = f.kind, f.enc, f.disk, 0
	binary.BigEndian.PutUint32(b[4:8], f.plen)
	binary.BigEndian.PutUint64(b[8:16], uint64(f.idx))
	binary.BigEndian.PutUint64(b[16:24], uint64(f.n))
}

func parseFrame(b []byte) (frame, error) {
	f := frame{kind: b[0], enc: b[1], disk: b[2], plen: binary.BigEndian.Uint32(b[4:8]),
		idx: int64(binary.BigEndian.Uint64(b[8:16])), n: int64(binary.BigEndian.Uint64(b[16:24]))}
	if b[3] != 0 {
		return f, fmt.Errorf("%w: reserved byte %#x", errStream, b[3])
	}
	switch f.kind {
	case kindData:
		if f.enc != encRaw && f.enc != encZstd {
			return f, fmt.Errorf("%w: unknown encoding %d", errStream, f.enc)
		}
		if f.n <= 0 || f.n > maxClusterSize || int64(f.plen) > f.n || f.plen == 0 {
			return f, fmt.Errorf("%w: data frame of %d bytes (%d encoded)", errStream, f.n, f.plen)
		}
		if f.enc == encRaw && int64(f.plen) != f.n {
			return f, fmt.Errorf("%w: raw frame of %d bytes carries %d", errStream, f.n, f.plen)
		}
	case kindZero:
		if f.plen != 0 || f.n <= 0 {
			return f, fmt.Errorf("%w: zero run of %d clusters", errStream, f.n)
		}
	case kindEnd:
		if f.plen != sha256.Size {
			return f, fmt.Errorf("%w: end frame", errStream)
		}
	case kindRef:
		if f.plen != refBody || f.n <= 0 || f.n > maxClusterSize {
			return f, fmt.Errorf("%w: reference frame of %d bytes", errStream, f.n)
		}
	default:
		return f, fmt.Errorf("%w: unknown frame kind %#x", errStream, f.kind)
	}
	if f.idx < 0 || f.n < 0 {
		return f, fmt.Errorf("%w: negative index", errStream)
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
			zstd.WithDecoderMaxMemory(maxClusterSize), zstd.WithDecoderMaxWindow(maxClusterSize))
	})
	return c.err
}

// encodedCluster is a data cluster ready to send.
type encodedCluster struct {
	disk   byte
	idx    int64
	digest Digest
	raw    int
	enc    byte
	data   []byte      // encoded (or raw) bytes
	ref    *clusterRef // sent as a reference to a layer the receiver holds
}

// encodeOptions says how clusters are encoded.
type encodeOptions struct {
	compress bool
	// known, when set, is the cluster's digest, computed by the caller from the
	// same bytes (the receiver checks it again): the cluster is not hashed again.
	known *Digest
	// refOf, when set, names a layer the receiver holds with the same cluster.
	refOf func(Digest) (clusterRef, bool)
}

// encodeCluster hashes and compresses one cluster; dst is reused when large enough.
// Data that does not shrink, or compress false, is sent raw: then the encoded
// data is raw itself, not a copy.
func encodeCluster(diskNo byte, idx int64, raw []byte, dst []byte, opts encodeOptions) (encodedCluster, error) {
	ec := encodedCluster{disk: diskNo, idx: idx, raw: len(raw)}
	if opts.known != nil {
		ec.digest = *opts.known
	} else {
		ec.digest = sha256.Sum256(raw)
	}
	if opts.refOf != nil {
		if ref, ok := opts.refOf(ec.digest); ok {
			ec.ref = &ref
			return ec, nil
		}
	}
	if !opts.compress {
		ec.enc, ec.data = encRaw, raw
		return ec, nil
	}
	if err := zc.init(); err != nil {
		return encodedCluster{}, err
	}
	if len(raw) >= 4*probeSize {
		// A sample that does not shrink says the cluster is random-like
		// (encrypted, already compressed): send it raw without paying for a
		// full compression attempt.
		if p := zc.enc.EncodeAll(raw[:probeSize], dst[:0]); len(p) > probeSize*31/32 {
			ec.enc, ec.data = encRaw, raw
			return ec, nil
		}
	}
	out := zc.enc.EncodeAll(raw, dst[:0])
	if len(out) < len(raw) {
		ec.enc, ec.data = encZstd, out
	} else {
		ec.enc, ec.data = encRaw, raw
	}
	return ec, nil
}

// decodeCluster decodes one data frame's payload into dst (len n) and checks it
// against the digest. A raw frame's cluster is payload itself, not a copy.
func decodeCluster(f frame, digest Digest, payload, dst []byte) ([]byte, error) {
	if err := zc.init(); err != nil {
		return nil, err
	}
	var raw []byte
	if f.enc == encRaw {
		raw = payload
	} else {
		out, err := zc.dec.DecodeAll(payload, dst[:0])
		if err != nil {
			return nil, fmt.Errorf("%w: cluster %d: zstd: %v", errStream, f.idx, err)
		}
		raw = out
	}
	if int64(len(raw)) != f.n {
		return nil, fmt.Errorf("%w: cluster %d decodes to %d bytes, header says %d", errStream, f.idx, len(raw), f.n)
	}
	if sha256.Sum256(raw) != digest {
		return nil, fmt.Errorf("%w: cluster %d", ErrDigestMismatch, f.idx)
	}
	return raw, nil
}

// streamWriter writes a cluster stream and counts its bytes.
type streamWriter struct {
	w     *bufio.Writer
	hdr   [frameHeader]byte
	bytes int64
	err   error
}

func newStreamWriter(w io.Writer) *streamWriter {
	sw := &streamWriter{w: bufio.NewWriterSize(w, 256<<10)}
	sw.write([]byte(streamMagic))
	return sw
}

func (sw *streamWriter) write(b []byte) {
	if sw.err != nil {
		return
	}
	n, err := sw.w.Write(b)
	sw.bytes += int64(n)
	sw.err = err
}

func (sw *streamWriter) data(c encodedCluster) error {
	f := frame{kind: kindData, enc: c.enc, disk: c.disk, plen: uint32(len(c.data)), idx: c.idx, n: int64(c.raw)}
	f.put(sw.hdr[:])
	sw.write(sw.hdr[:])
	sw.write(c.digest[:])
	sw.write(c.data)
	return sw.err
}

func (sw *streamWriter) reference(c encodedCluster) error {
	f := frame{kind: kindRef, disk: c.disk, plen: refBody, idx: c.idx, n: int64(c.raw)}
	f.put(sw.hdr[:])
	sw.write(sw.hdr[:])
	sw.write(c.digest[:])
	id, err := hexID(c.ref.Layer)
	if err != nil {
		return err
	}
	sw.write(id)
	sw.write(binary.BigEndian.AppendUint64(nil, uint64(c.ref.Index)))
	return sw.err
}

func (sw *streamWriter) zeros(diskNo byte, idx, n int64) error {
	f := frame{kind: kindZero, disk: diskNo, idx: idx, n: n}
	f.put(sw.hdr[:])
	sw.write(sw.hdr[:])
	return sw.err
}

func (sw *streamWriter) end(entries int64, id []byte) error {
	f := frame{kind: kindEnd, plen: sha256.Size, idx: entries}
	f.put(sw.hdr[:])
	sw.write(sw.hdr[:])
	var b [sha256.Size]byte
	copy(b[:], id)
	sw.write(b[:])
	return sw.flush()
}

func (sw *streamWriter) flush() error {
	if sw.err == nil {
		sw.err = sw.w.Flush()
	}
	return sw.err
}

// streamReader reads a cluster stream.
type streamReader struct {
	r     *bufio.Reader
	hdr   [frameHeader]byte
	n     atomic.Int64 // bytes read (decodeOrdered reads on a goroutine of its own)
	magic bool
}

// bytes is how many bytes of the stream were read so far.
func (sr *streamReader) bytes() int64 { return sr.n.Load() }

func newStreamReader(r io.Reader) *streamReader {
	// A small buffer: payloads larger than it are read straight into their own
	// buffers instead of being copied out of it.
	return &streamReader{r: bufio.NewReaderSize(r, 16<<10)}
}

func (sr *streamReader) full(b []byte) error {
	n, err := io.ReadFull(sr.r, b)
	sr.n.Add(int64(n))
	if err == io.EOF || err == io.ErrUnexpectedEOF {
		return fmt.Errorf("%w: truncated", errStream)
	}
	return err
}

// next reads the next frame header and, for a data frame, its digest and payload
// (payload is reused between calls).
func (sr *streamReader) next(payload []byte) (frame, Digest, []byte, error) {
	var d Digest
	if !sr.magic {
		var m [len(streamMagic)]byte
		if err := sr.full(m[:]); err != nil {
			return frame{}, d, nil, err
		}
		if string(m[:]) != streamMagic {
			return frame{}, d, nil, fmt.Errorf("%w: bad magic", errStream)
		}
		sr.magic = true
	}
	if err := sr.full(sr.hdr[:]); err != nil {
		return frame{}, d, nil, err
	}
	f, err := parseFrame(sr.hdr[:])
	if err != nil {
		return f, d, nil, err
	}
	switch f.kind {
	case kindData, kindRef:
		if err := sr.full(d[:]); err != nil {
			return f, d, nil, err
		}
		if f.kind == kindRef {
			f.plen -= sha256.Size // what follows the digest
		}
		if cap(payload) < int(f.plen) {
			payload = make([]byte, f.plen)
		}
		payload = payload[:f.plen]
		if err := sr.full(payload); err != nil {
			return f, d, nil, err
		}
		return f, d, payload, nil
	case kindEnd:
		if err := sr.full(d[:]); err != nil {
			return f, d, nil, err
		}
	}
	return f, d, nil, nil
}
