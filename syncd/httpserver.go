package syncd

import (
	"io"
	"log"
	"net"
	"net/http"
	"sync"
	"time"
)

// Limits of the HTTP side against slow, idle and endless clients (defaults of
// ServerOptions): a client that sends no header within HeaderTimeout, idles
// longer than IdleTimeout between requests, or moves no byte of a body or a
// stream for ProgressTimeout is cut off; at most MaxConns connections are open
// at once (the others wait in the kernel's backlog and hold no descriptor).
const (
	defaultHeaderTimeout   = 10 * time.Second
	defaultIdleTimeout     = 2 * time.Minute
	defaultProgressTimeout = time.Minute
	defaultMaxConns        = 4096
	maxHeaderBytes         = 64 << 10
)

// HTTPServer is an http.Server for the API with the server's timeouts. Serve it
// on a listener from Listen (or one wrapped by LimitListener).
func (s *Server) HTTPServer(errLog *log.Logger) *http.Server {
	return &http.Server{
		Handler:           s.Handler(),
		ReadHeaderTimeout: s.opts.HeaderTimeout,
		IdleTimeout:       s.opts.IdleTimeout,
		MaxHeaderBytes:    maxHeaderBytes,
		ErrorLog:          errLog,
	}
}

// Listen listens on the TCP address addr, with at most the server's MaxConns
// connections open at once.
func (s *Server) Listen(addr string) (net.Listener, error) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, err
	}
	return LimitListener(ln, s.opts.MaxConns), nil
}

// LimitListener returns a listener that has at most n connections open at once:
// Accept waits while n are open.
func LimitListener(ln net.Listener, n int) net.Listener {
	return &limitListener{Listener: ln, sem: make(chan struct{}, n), done: make(chan struct{})}
}

type limitListener struct {
	net.Listener
	sem       chan struct{}
	done      chan struct{}
	closeOnce sync.Once
}

func (l *limitListener) Accept() (net.Conn, error) {
	select {
	case l.sem <- struct{}{}:
	case <-l.done:
		return nil, net.ErrClosed
	}
	c, err := l.Listener.Accept()
	if err != nil {
		<-l.sem
		return nil, err
	}
	return &limitConn{Conn: c, release: func() { <-l.sem }}, nil
}

func (l *limitListener) Close() error {
	l.closeOnce.Do(func() { close(l.done) })
	return l.Listener.Close()
}

type limitConn struct {
	net.Conn
	once    sync.Once
	release func()
}

func (c *limitConn) Close() error {
	err := c.Conn.Close()
	c.once.Do(c.release)
	return err
}

// progressReader moves a request's read deadline on at every read: a body that
// stops arriving for the progress timeout ends the request.
type progressReader struct {
	r  io.ReadCloser
	rc *http.ResponseController
	d  time.Duration
}

func (p *progressReader) Read(b []byte) (int, error) {
	p.rc.SetReadDeadline(time.Now().Add(p.d))
	return p.r.Read(b)
}

func (p *progressReader) Close() error { return p.r.Close() }
