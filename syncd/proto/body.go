package proto

import (
	"errors"
	"io"
	"sync"
)

// FuncBody is a request body that a function writes. HTTP/1.1's transport
// copies a body that is an io.WriterTo by calling WriteTo with the connection's
// chunk writer, so the stream goes from the encoder into the connection in the
// encoder's own writes, without a pipe and a copy between them. Read (HTTP/2,
// or anything else that reads) runs the function into a pipe instead.
//
// The function runs at most once. After the request returns, finish waits for
// it to end (or keeps it from starting) and returns its error.
type FuncBody struct {
	fn func(w io.Writer) error

	mu      sync.Mutex
	state   int // 0 idle, 1 running, 2 finished or never to run
	done    chan struct{}
	err     error
	pr      *io.PipeReader
	written int64
}

var ErrBodyNotRun = errors.New("request ended before its body was written")

func NewFuncBody(fn func(w io.Writer) error) *FuncBody {
	return &FuncBody{fn: fn, done: make(chan struct{})}
}

// start moves the body to running; false when it ran or finish came first.
func (b *FuncBody) start() bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.state != 0 {
		return false
	}
	b.state = 1
	return true
}

func (b *FuncBody) run(w io.Writer) error {
	err := b.fn(w)
	b.mu.Lock()
	b.err, b.state = err, 2
	b.mu.Unlock()
	close(b.done)
	return err
}

// WriteTo writes the body into w (the transport's chunk writer).
func (b *FuncBody) WriteTo(w io.Writer) (int64, error) {
	if !b.start() {
		return 0, ErrBodyNotRun
	}
	cw := &countingWriter{w: w}
	err := b.run(cw)
	return cw.n, err
}

// Read reads the body through a pipe fed by the function.
func (b *FuncBody) Read(p []byte) (int, error) {
	b.mu.Lock()
	if b.pr == nil && b.state == 0 {
		pr, pw := io.Pipe()
		b.pr, b.state = pr, 1
		go func() { pw.CloseWithError(b.run(pw)) }()
	}
	pr := b.pr
	b.mu.Unlock()
	if pr == nil {
		return 0, ErrBodyNotRun
	}
	return pr.Read(p)
}

// Finish, called once the request returned, waits for a running function (a
// pipe's reader goes away first, so that it cannot block) and returns its error;
// a body never started stays so.
func (b *FuncBody) Finish() error {
	b.mu.Lock()
	switch b.state {
	case 0:
		b.state = 2
		b.mu.Unlock()
		return ErrBodyNotRun
	case 2:
		b.mu.Unlock()
		return b.err
	}
	pr := b.pr
	b.mu.Unlock()
	if pr != nil {
		pr.CloseWithError(io.ErrClosedPipe)
	}
	<-b.done
	return b.err
}

type countingWriter struct {
	w io.Writer
	n int64
}

func (c *countingWriter) Write(p []byte) (int, error) {
	n, err := c.w.Write(p)
	c.n += int64(n)
	return n, err
}
