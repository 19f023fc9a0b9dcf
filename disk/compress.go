package disk

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"sync"

	kflate "github.com/klauspost/compress/flate"
	"github.com/klauspost/compress/zstd"
)

// QEMU inflates with a 4 KiB window (windowBits -12), so deflate data written for
// qcow2 must not refer back further than 4 KiB.
const deflateWindow = 4096

var (
	zstdDecoders = sync.Pool{New: func() any {
		d, err := zstd.NewReader(nil, zstd.WithDecoderConcurrency(1), zstd.WithDecoderMaxMemory(64<<20))
		if err != nil {
			panic(err) // only for invalid options
		}
		return d
	}}
	deflateWriters = sync.Pool{New: func() any {
		w, err := kflate.NewWriterWindow(nil, deflateWindow)
		if err != nil {
			panic(err) // only for an invalid window
		}
		return w
	}}
	zstdEncoders = sync.Pool{New: func() any {
		e, err := zstd.NewWriter(nil, zstd.WithEncoderConcurrency(1), zstd.WithEncoderLevel(zstd.SpeedFastest),
			zstd.WithEncoderCRC(false), zstd.WithWindowSize(1<<21))
		if err != nil {
			panic(err)
		}
		return e
	}}
)

// decompress fills out (one cluster) from src, which may carry trailing bytes
// of the next compressed cluster.
func decompress(typ uint8, src, out []byte) error {
	switch typ {
	case compressionDeflate:
		r := kflate.NewReader(bytes.NewReader(src))
		defer r.Close()
		if _, err := io.ReadFull(r, out); err != nil {
			return fmt.Errorf("inflate: %w", err)
		}
		return nil
	case compressionZstd:
		d := zstdDecoders.Get().(*zstd.Decoder)
		defer zstdDecoders.Put(d)
		if err := d.Reset(bytes.NewReader(src)); err != nil {
			return fmt.Errorf("zstd: %w", err)
		}
		if _, err := io.ReadFull(d, out); err != nil {
			return fmt.Errorf("zstd: %w", err)
		}
		return nil
	}
	return fmt.Errorf("%w: compression type %d", ErrUnsupported, typ)
}

var errIncompressible = errors.New("cluster does not compress")

// compress returns the compressed form of one cluster, or errIncompressible when
// it would not be smaller.
func compress(typ uint8, src []byte) ([]byte, error) {
	var out []byte
	switch typ {
	case compressionDeflate:
		var b bytes.Buffer
		b.Grow(len(src) / 2)
		w := deflateWriters.Get().(*kflate.Writer)
		w.Reset(&b)
		_, err := w.Write(src)
		if err == nil {
			err = w.Close()
		}
		deflateWriters.Put(w)
		if err != nil {
			return nil, err
		}
		out = b.Bytes()
	case compressionZstd:
		e := zstdEncoders.Get().(*zstd.Encoder)
		out = e.EncodeAll(src, nil)
		zstdEncoders.Put(e)
	default:
		return nil, fmt.Errorf("%w: compression type %d", ErrUnsupported, typ)
	}
	if len(out) >= len(src) {
		return nil, errIncompressible
	}
	return out, nil
}
