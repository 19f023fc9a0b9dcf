package nbd

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
)

// request is one transmission request's header.
type request struct {
	flags  uint16
	typ    uint16
	cookie uint64
	off    uint64
	length uint32
}

// transmit serves requests until the client disconnects.
func (cn *conn) transmit() error {
	var h [28]byte
	for {
		if err := cn.readFull(h[:]); err != nil {
			if errors.Is(err, io.ErrUnexpectedEOF) {
				return fmt.Errorf("%w: truncated request", errProtocol)
			}
			return err
		}
		if binary.BigEndian.Uint32(h[0:]) != magicRequest {
			return fmt.Errorf("%w: request magic", errProtocol)
		}
		rq := request{flags: binary.BigEndian.Uint16(h[4:]), typ: binary.BigEndian.Uint16(h[6:]),
			cookie: binary.BigEndian.Uint64(h[8:]), off: binary.BigEndian.Uint64(h[16:]), length: binary.BigEndian.Uint32(h[24:])}
		switch rq.typ {
		case cmdDisc:
			return io.EOF
		case cmdWrite:
			// The payload follows the header whatever the answer.
			if rq.length > MaxRequest {
				return fmt.Errorf("%w: write of %d bytes", errProtocol, rq.length)
			}
			if _, err := io.CopyN(io.Discard, cn.r, int64(rq.length)); err != nil {
				return err
			}
			if err := cn.replyErr(rq, errPerm, "the export is read-only"); err != nil {
				return err
			}
		case cmdTrim, cmdWriteZeroes:
			if err := cn.replyErr(rq, errPerm, "the export is read-only"); err != nil {
				return err
			}
		case cmdFlush:
			var err error
			if f, ok := cn.exp.(Flusher); ok {
				cn.wg.Wait()
				err = f.Flush()
			}
			if err != nil {
				err = cn.replyErr(rq, errIO, err.Error())
			} else {
				err = cn.replyOK(rq)
			}
			if err != nil {
				return err
			}
		case cmdRead:
			if e, msg := cn.checkRange(rq); e != 0 {
				if err := cn.replyErr(rq, e, msg); err != nil {
					return err
				}
				continue
			}
			cn.acquire(int64(rq.length))
			cn.wg.Add(1)
			go func() {
				defer cn.wg.Done()
				defer cn.release(int64(rq.length))
				if err := cn.read(rq); err != nil {
					cn.c.Close()
				}
			}()
		case cmdBlockStatus:
			if !cn.structured || !cn.meta {
				if err := cn.replyErr(rq, errInval, "block status needs base:allocation"); err != nil {
					return err
				}
				continue
			}
			if e, msg := cn.checkRange(rq); e != 0 {
				if err := cn.replyErr(rq, e, msg); err != nil {
					return err
				}
				continue
			}
			cn.wg.Add(1)
			go func() {
				defer cn.wg.Done()
				if err := cn.blockStatus(rq); err != nil {
					cn.c.Close()
				}
			}()
		default:
			if err := cn.replyErr(rq, errInval, fmt.Sprintf("command %d is not supported", rq.typ)); err != nil {
				return err
			}
		}
	}
}

// checkRange refuses a request beyond the export or longer than MaxRequest.
func (cn *conn) checkRange(rq request) (uint32, string) {
	size := uint64(cn.exp.Size())
	if rq.off > size || uint64(rq.length) > size-rq.off {
		return errInval, fmt.Sprintf("%d+%d is beyond the export's %d bytes", rq.off, rq.length, size)
	}
	if rq.typ == cmdRead && rq.length > MaxRequest {
		return errOverflow, fmt.Sprintf("read of %d bytes; at most %d", rq.length, MaxRequest)
	}
	return 0, ""
}

// acquire waits until n more bytes of read buffers fit the connection's bound.
func (cn *conn) acquire(n int64) {
	cn.budgetMu.Lock()
	for cn.used > 0 && cn.used+n > inflightBytes {
		cn.budget.Wait()
	}
	cn.used += n
	cn.budgetMu.Unlock()
}

func (cn *conn) release(n int64) {
	cn.budgetMu.Lock()
	cn.used -= n
	cn.budgetMu.Unlock()
	cn.budget.Broadcast()
}

func (cn *conn) read(rq request) error {
	buf := make([]byte, rq.length)
	if _, err := cn.exp.ReadAt(buf, int64(rq.off)); err != nil && !(errors.Is(err, io.EOF) && len(buf) == 0) {
		cn.s.log().Warn("nbd read failed", "export", cn.name, "off", rq.off, "len", rq.length, "err", err)
		return cn.replyErr(rq, errIO, err.Error())
	}
	if !cn.structured {
		return cn.simple(rq, 0, buf)
	}
	if rq.length == 0 {
		return cn.chunk(rq, replyFlagDone, chunkNone, nil, nil)
	}
	off := binary.BigEndian.AppendUint64(nil, rq.off)
	return cn.chunk(rq, replyFlagDone, chunkOffsetData, off, buf)
}

// blockStatus answers with base:allocation descriptors for the range.
func (cn *conn) blockStatus(rq request) error {
	exts, err := cn.exp.Extents(int64(rq.off), int64(rq.length))
	if err != nil {
		return cn.replyErr(rq, errIO, err.Error())
	}
	b := binary.BigEndian.AppendUint32(nil, metaAllocationID)
	left := int64(rq.length)
	n := 0
	var last uint32 = 1 << 31
	for _, e := range exts {
		if e.Len <= 0 || left <= 0 {
			break
		}
		l := min(e.Len, left)
		var fl uint32
		if e.Hole {
			fl |= stateHole
		}
		if e.Zero {
			fl |= stateZero
		}
		if fl == last && n > 0 {
			// Merge with the previous descriptor.
			p := len(b) - 8
			binary.BigEndian.PutUint32(b[p:], binary.BigEndian.Uint32(b[p:])+uint32(l))
		} else {
			if n == maxExtents || (n == 1 && rq.flags&cmdFlagReqOne != 0) {
				break
			}
			b = binary.BigEndian.AppendUint32(b, uint32(l))
			b = binary.BigEndian.AppendUint32(b, fl)
			n++
			last = fl
		}
		left -= l
	}
	if n == 0 {
		return cn.replyErr(rq, errIO, "no extent for the range")
	}
	return cn.chunk(rq, replyFlagDone, chunkBlockStatus, b, nil)
}

// replyOK answers a request that carries no data.
func (cn *conn) replyOK(rq request) error {
	if cn.structured {
		return cn.chunk(rq, replyFlagDone, chunkNone, nil, nil)
	}
	return cn.simple(rq, 0, nil)
}

// replyErr answers a request with an error (and a message, when structured).
func (cn *conn) replyErr(rq request, errno uint32, msg string) error {
	if !cn.structured {
		return cn.simple(rq, errno, nil)
	}
	if len(msg) > 4096 {
		msg = msg[:4096]
	}
	b := binary.BigEndian.AppendUint32(nil, errno)
	b = binary.BigEndian.AppendUint16(b, uint16(len(msg)))
	return cn.chunk(rq, replyFlagDone, chunkError, append(b, msg...), nil)
}

func (cn *conn) simple(rq request, errno uint32, data []byte) error {
	var h [16]byte
	binary.BigEndian.PutUint32(h[0:], magicSimple)
	binary.BigEndian.PutUint32(h[4:], errno)
	binary.BigEndian.PutUint64(h[8:], rq.cookie)
	cn.wmu.Lock()
	defer cn.wmu.Unlock()
	cn.w.Write(h[:])
	if errno == 0 {
		cn.w.Write(data)
	}
	return cn.flush()
}

// chunk writes one structured reply chunk: head then tail as its payload.
func (cn *conn) chunk(rq request, flags, typ uint16, head, tail []byte) error {
	var h [20]byte
	binary.BigEndian.PutUint32(h[0:], magicStruct)
	binary.BigEndian.PutUint16(h[4:], flags)
	binary.BigEndian.PutUint16(h[6:], typ)
	binary.BigEndian.PutUint64(h[8:], rq.cookie)
	binary.BigEndian.PutUint32(h[16:], uint32(len(head)+len(tail)))
	cn.wmu.Lock()
	defer cn.wmu.Unlock()
	cn.w.Write(h[:])
	cn.w.Write(head)
	cn.w.Write(tail)
	return cn.flush()
}
