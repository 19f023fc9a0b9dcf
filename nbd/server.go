package nbd

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"sync"
	"time"
)

// Export is what a server serves under a name: a read-only disk.
type Export interface {
	// Size is the export's size in bytes.
	Size() int64
	// ReadAt reads len(p) bytes at off (off+len(p) <= Size). An error fails
	// the client's read with EIO and the error's text.
	ReadAt(p []byte, off int64) (int, error)
	// Extents describes [off, off+n) as consecutive extents from off on; they
	// may end before off+n (the client asks again) but not after it.
	Extents(off, n int64) ([]Extent, error)
}

// Extent is a run of an export with one allocation state.
type Extent struct {
	Len int64
	// Hole: no data is allocated for the run. Zero: it reads as zeros.
	Hole, Zero bool
}

// Flusher is an export with a flush of its own (NBD_CMD_FLUSH).
type Flusher interface {
	Flush() error
}

// Limits of the server: what a client may ask for at once.
const (
	// MaxRequest is the longest read a request may ask for (QEMU asks for at
	// most 32 MiB).
	MaxRequest = 32 << 20
	// maxOption bounds an option's payload (names are at most 4096 bytes).
	maxOption = 8 << 10
	// maxExtents bounds the descriptors of one block status reply.
	maxExtents = 2048
	// inflightBytes bounds the read buffers of one connection's requests.
	inflightBytes = 64 << 20
	// maxQueries bounds a meta context request's queries.
	maxQueries = 64
)

// Server serves exports over connections a listener accepts.
type Server struct {
	// Lookup finds an export by name ("" is the default name).
	Lookup func(name string) (Export, bool)
	// Names lists the exports (NBD_OPT_LIST); nil lists none.
	Names func() []string
	// Log gets connection errors; nil discards them.
	Log *slog.Logger
	// HandshakeTimeout bounds the negotiation (10 s when 0): a client that
	// connects and says nothing is dropped.
	HandshakeTimeout time.Duration
}

// ErrClosed is what Serve returns once its context ends.
var ErrClosed = errors.New("nbd server closed")

// errProtocol ends a connection whose client broke the protocol.
var errProtocol = errors.New("nbd protocol error")

// Serve accepts connections until ctx ends or ln fails, serving each on a
// goroutine of its own; it returns when every connection has ended.
func (s *Server) Serve(ctx context.Context, ln net.Listener) error {
	var wg sync.WaitGroup
	defer wg.Wait()
	stop := context.AfterFunc(ctx, func() { ln.Close() })
	defer stop()
	for {
		c, err := ln.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return ErrClosed
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				time.Sleep(10 * time.Millisecond)
				continue
			}
			return err
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := s.ServeConn(ctx, c); err != nil && !errors.Is(err, io.EOF) && ctx.Err() == nil {
				s.log().Info("nbd connection ended", "err", err)
			}
		}()
	}
}

func (s *Server) log() *slog.Logger {
	if s.Log == nil {
		return slog.New(slog.DiscardHandler)
	}
	return s.Log
}

// conn is one client's connection.
type conn struct {
	s          *Server
	c          net.Conn
	r          *bufio.Reader
	wmu        sync.Mutex
	w          *bufio.Writer
	structured bool
	meta       bool // base:allocation selected
	noZeroes   bool
	exp        Export
	name       string

	budgetMu sync.Mutex
	budget   *sync.Cond
	used     int64
	wg       sync.WaitGroup
}

// ServeConn runs the handshake and then serves c's requests until the client
// disconnects, breaks the protocol or ctx ends. It closes c.
func (s *Server) ServeConn(ctx context.Context, c net.Conn) error {
	defer c.Close()
	stop := context.AfterFunc(ctx, func() { c.Close() })
	defer stop()
	cn := &conn{s: s, c: c, r: bufio.NewReaderSize(c, 64<<10), w: bufio.NewWriterSize(c, 64<<10)}
	cn.budget = sync.NewCond(&cn.budgetMu)
	hs := s.HandshakeTimeout
	if hs <= 0 {
		hs = 10 * time.Second
	}
	c.SetDeadline(time.Now().Add(hs))
	ok, err := cn.negotiate()
	if err != nil || !ok {
		return err
	}
	c.SetDeadline(time.Time{})
	err = cn.transmit()
	cn.wg.Wait()
	return err
}

func (cn *conn) flush() error { return cn.w.Flush() }

func (cn *conn) readFull(b []byte) error {
	_, err := io.ReadFull(cn.r, b)
	return err
}

// negotiate runs the fixed newstyle handshake; ok says an export was chosen.
func (cn *conn) negotiate() (ok bool, err error) {
	var b [18]byte
	binary.BigEndian.PutUint64(b[0:], magicNBD)
	binary.BigEndian.PutUint64(b[8:], magicOpt)
	binary.BigEndian.PutUint16(b[16:], flagFixedNewstyle|flagNoZeroes)
	cn.w.Write(b[:])
	if err := cn.flush(); err != nil {
		return false, err
	}
	var cf [4]byte
	if err := cn.readFull(cf[:]); err != nil {
		return false, err
	}
	flags := binary.BigEndian.Uint32(cf[:])
	if flags&flagFixedNewstyle == 0 || flags&^uint32(flagFixedNewstyle|flagNoZeroes) != 0 {
		return false, fmt.Errorf("%w: client flags %#x", errProtocol, flags)
	}
	cn.noZeroes = flags&flagNoZeroes != 0
	for {
		var h [16]byte
		if err := cn.readFull(h[:]); err != nil {
			return false, err
		}
		if binary.BigEndian.Uint64(h[0:]) != magicOpt {
			return false, fmt.Errorf("%w: option magic", errProtocol)
		}
		opt := binary.BigEndian.Uint32(h[8:])
		n := binary.BigEndian.Uint32(h[12:])
		if n > maxOption {
			if n > 1<<20 {
				return false, fmt.Errorf("%w: option %d of %d bytes", errProtocol, opt, n)
			}
			if _, err := io.CopyN(io.Discard, cn.r, int64(n)); err != nil {
				return false, err
			}
			if err := cn.optReply(opt, repErrTooBig, []byte("option too long")); err != nil {
				return false, err
			}
			continue
		}
		data := make([]byte, n)
		if err := cn.readFull(data); err != nil {
			return false, err
		}
		done, err := cn.option(opt, data)
		if err != nil || done {
			return done && err == nil, err
		}
	}
}

// optReply writes one option reply and flushes it.
func (cn *conn) optReply(opt, typ uint32, data []byte) error {
	var h [20]byte
	binary.BigEndian.PutUint64(h[0:], magicReply)
	binary.BigEndian.PutUint32(h[8:], opt)
	binary.BigEndian.PutUint32(h[12:], typ)
	binary.BigEndian.PutUint32(h[16:], uint32(len(data)))
	cn.w.Write(h[:])
	cn.w.Write(data)
	return cn.flush()
}

func (cn *conn) optErr(opt, typ uint32, format string, args ...any) error {
	return cn.optReply(opt, typ, fmt.Appendf(nil, format, args...))
}

// tflags are the transmission flags of every export: read-only, flush, DF
// and multi-conn (reads of an immutable export agree across connections).
const tflags = tflagHasFlags | tflagReadOnly | tflagSendFlush | tflagSendDF | tflagMultiConn

// option handles one option; done means transmission starts (or the client
// aborted, with done and errAbort).
func (cn *conn) option(opt uint32, data []byte) (done bool, err error) {
	switch opt {
	case optExportName:
		exp, ok := cn.s.Lookup(string(data))
		if !ok {
			// The protocol has no error reply here: the server disconnects.
			return false, fmt.Errorf("%w: no export %q", errProtocol, data)
		}
		cn.exp, cn.name = exp, string(data)
		var b [10 + 124]byte
		binary.BigEndian.PutUint64(b[0:], uint64(exp.Size()))
		binary.BigEndian.PutUint16(b[8:], tflags)
		n := len(b)
		if cn.noZeroes {
			n = 10
		}
		cn.w.Write(b[:n])
		return true, cn.flush()
	case optAbort:
		cn.optReply(opt, repAck, nil)
		return false, io.EOF
	case optList:
		if len(data) != 0 {
			return false, cn.optErr(opt, repErrInvalid, "list takes no data")
		}
		if cn.s.Names != nil {
			for _, name := range cn.s.Names() {
				b := binary.BigEndian.AppendUint32(nil, uint32(len(name)))
				if err := cn.optReply(opt, repServer, append(b, name...)); err != nil {
					return false, err
				}
			}
		}
		return false, cn.optReply(opt, repAck, nil)
	case optInfo, optGo:
		return cn.infoGo(opt, data)
	case optStructuredReply:
		if len(data) != 0 {
			return false, cn.optErr(opt, repErrInvalid, "structured reply takes no data")
		}
		if cn.structured {
			return false, cn.optErr(opt, repErrInvalid, "structured replies already negotiated")
		}
		cn.structured = true
		return false, cn.optReply(opt, repAck, nil)
	case optListMetaContext, optSetMetaContext:
		return false, cn.metaContext(opt, data)
	case optStartTLS:
		return false, cn.optErr(opt, repErrPolicy, "TLS is not offered on this socket")
	}
	return false, cn.optErr(opt, repErrUnsup, "option %d is not supported", opt)
}

// infoGo answers NBD_OPT_INFO and NBD_OPT_GO: the export's size and flags,
// its block sizes, and its name when asked.
func (cn *conn) infoGo(opt uint32, data []byte) (bool, error) {
	if len(data) < 6 {
		return false, cn.optErr(opt, repErrInvalid, "short request")
	}
	nl := binary.BigEndian.Uint32(data)
	if uint64(nl)+6 > uint64(len(data)) {
		return false, cn.optErr(opt, repErrInvalid, "name length %d beyond the request", nl)
	}
	name := string(data[4 : 4+nl])
	rest := data[4+nl:]
	nreq := int(binary.BigEndian.Uint16(rest))
	if len(rest) != 2+2*nreq {
		return false, cn.optErr(opt, repErrInvalid, "%d information requests in %d bytes", nreq, len(rest)-2)
	}
	exp, ok := cn.s.Lookup(name)
	if !ok {
		return false, cn.optErr(opt, repErrUnknown, "no export %q", name)
	}
	wantName := false
	for i := range nreq {
		if binary.BigEndian.Uint16(rest[2+2*i:]) == infoName {
			wantName = true
		}
	}
	info := binary.BigEndian.AppendUint16(nil, infoExport)
	info = binary.BigEndian.AppendUint64(info, uint64(exp.Size()))
	info = binary.BigEndian.AppendUint16(info, tflags)
	if err := cn.optReply(opt, repInfo, info); err != nil {
		return false, err
	}
	bs := binary.BigEndian.AppendUint16(nil, infoBlockSize)
	bs = binary.BigEndian.AppendUint32(bs, 1)
	bs = binary.BigEndian.AppendUint32(bs, 4096)
	bs = binary.BigEndian.AppendUint32(bs, MaxRequest)
	if err := cn.optReply(opt, repInfo, bs); err != nil {
		return false, err
	}
	if wantName {
		nb := binary.BigEndian.AppendUint16(nil, infoName)
		if err := cn.optReply(opt, repInfo, append(nb, name...)); err != nil {
			return false, err
		}
	}
	if err := cn.optReply(opt, repAck, nil); err != nil {
		return false, err
	}
	if opt == optInfo {
		return false, nil
	}
	cn.exp, cn.name = exp, name
	return true, nil
}

// metaContext answers NBD_OPT_LIST_META_CONTEXT and NBD_OPT_SET_META_CONTEXT:
// base:allocation is the one context.
func (cn *conn) metaContext(opt uint32, data []byte) error {
	if !cn.structured {
		return cn.optErr(opt, repErrInvalid, "meta contexts need structured replies")
	}
	bad := func(what string) error { return cn.optErr(opt, repErrInvalid, "meta context request: %s", what) }
	if len(data) < 8 {
		return bad("short")
	}
	nl := binary.BigEndian.Uint32(data)
	if uint64(nl)+8 > uint64(len(data)) {
		return bad("export name beyond the request")
	}
	name := string(data[4 : 4+nl])
	rest := data[4+nl:]
	nq := binary.BigEndian.Uint32(rest)
	rest = rest[4:]
	if nq > maxQueries {
		return cn.optErr(opt, repErrTooBig, "%d queries, at most %d", nq, maxQueries)
	}
	var queries []string
	for range nq {
		if len(rest) < 4 {
			return bad("query beyond the request")
		}
		ql := binary.BigEndian.Uint32(rest)
		if uint64(ql)+4 > uint64(len(rest)) {
			return bad("query beyond the request")
		}
		queries = append(queries, string(rest[4:4+ql]))
		rest = rest[4+ql:]
	}
	if len(rest) != 0 {
		return bad("trailing bytes")
	}
	if _, ok := cn.s.Lookup(name); !ok {
		return cn.optErr(opt, repErrUnknown, "no export %q", name)
	}
	match := false
	for _, q := range queries {
		if q == metaAllocation || (opt == optListMetaContext && (q == "base:" || q == "base")) {
			match = true
		}
	}
	if opt == optListMetaContext && len(queries) == 0 {
		match = true
	}
	if opt == optSetMetaContext {
		cn.meta = match
	}
	if match {
		b := binary.BigEndian.AppendUint32(nil, metaAllocationID)
		if err := cn.optReply(opt, repMetaContext, append(b, metaAllocation...)); err != nil {
			return err
		}
	}
	return cn.optReply(opt, repAck, nil)
}
