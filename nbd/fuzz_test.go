package nbd_test

import (
	"bytes"
	"context"
	"encoding/binary"
	"net"
	"testing"
	"time"

	"github.com/cvd-project/cvd/nbd"
)

// scriptConn is a client that sends fixed bytes and ignores the answers.
type scriptConn struct {
	r *bytes.Reader
	n int
}

func (c *scriptConn) Read(p []byte) (int, error) { return c.r.Read(p) }
func (c *scriptConn) Write(p []byte) (int, error) {
	c.n += len(p)
	return len(p), nil
}
func (c *scriptConn) Close() error                     { return nil }
func (c *scriptConn) LocalAddr() net.Addr              { return &net.UnixAddr{} }
func (c *scriptConn) RemoteAddr() net.Addr             { return &net.UnixAddr{} }
func (c *scriptConn) SetDeadline(time.Time) error      { return nil }
func (c *scriptConn) SetReadDeadline(time.Time) error  { return nil }
func (c *scriptConn) SetWriteDeadline(time.Time) error { return nil }

// FuzzServeConn feeds the server arbitrary client bytes after a valid greeting
// prefix: it must end the connection without a panic, whatever they say.
func FuzzServeConn(f *testing.F) {
	opt := func(o uint32, data []byte) []byte {
		b := binary.BigEndian.AppendUint64(nil, 0x49484156454f5054)
		b = binary.BigEndian.AppendUint32(b, o)
		b = binary.BigEndian.AppendUint32(b, uint32(len(data)))
		return append(b, data...)
	}
	req := func(typ uint16, off uint64, n uint32) []byte {
		b := binary.BigEndian.AppendUint32(nil, 0x25609513)
		b = binary.BigEndian.AppendUint16(b, 0)
		b = binary.BigEndian.AppendUint16(b, typ)
		b = binary.BigEndian.AppendUint64(b, 1)
		b = binary.BigEndian.AppendUint64(b, off)
		return binary.BigEndian.AppendUint32(b, n)
	}
	goDefault := opt(7, []byte{0, 0, 0, 0, 0, 0})
	meta := binary.BigEndian.AppendUint32(nil, 0)
	meta = binary.BigEndian.AppendUint32(meta, 1)
	meta = binary.BigEndian.AppendUint32(meta, 15)
	meta = append(meta, "base:allocation"...)
	flags := []byte{0, 0, 0, 3}
	f.Add(append(append([]byte{}, flags...), goDefault...))
	f.Add(bytes.Join([][]byte{flags, opt(8, nil), opt(10, meta), goDefault, req(0, 0, 4096), req(7, 0, 65536), req(1, 0, 8), make([]byte, 8), req(2, 0, 0)}, nil))
	f.Add(bytes.Join([][]byte{flags, opt(1, nil), req(0, 65000, 4096), req(3, 0, 0)}, nil))
	f.Add(bytes.Join([][]byte{flags, opt(3, nil), opt(6, []byte{0, 0, 0, 1, 'x', 0, 0}), opt(9, meta), opt(2, nil)}, nil))
	exp := memExport(bytes.Repeat([]byte{1, 2, 3}, 1<<14))
	s := &nbd.Server{Lookup: func(name string) (nbd.Export, bool) { return exp, name == "" }, Names: func() []string { return []string{""} }}
	f.Fuzz(func(t *testing.T, in []byte) {
		c := &scriptConn{r: bytes.NewReader(in)}
		err := s.ServeConn(context.Background(), c)
		if err == nil {
			t.Fatal("ServeConn returned nil for a client that went away")
		}
	})
}
