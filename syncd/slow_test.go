package syncd

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/cvd-project/cvd/internal/testutil"
	"github.com/cvd-project/cvd/syncd/laptop"
)

// openFDs counts this process's open file descriptors.
func openFDs(t *testing.T) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}

// TestSlowAndIdleClients: the server's HTTP side holds up against clients that
// connect and send nothing, send a body and stall, or ask for a stream and never
// read it: it keeps at most MaxConns connections, cuts each of those off after
// its timeout, and an authorized call still gets through.
func TestSlowAndIdleClients(t *testing.T) {
	ctx := context.Background()
	spec := smallSpec()
	spec.baseWrites = []write{{off: 0, data: testutil.Fill(1, 48*MiB, false)}} // a stream larger than the socket buffers
	w := newWorld(t, spec)
	const maxConns = 8
	srv, err := NewServer(w.store, ServerOptions{Admin: true, Logger: testLogger(), MaxConns: maxConns,
		HeaderTimeout: time.Second, IdleTimeout: time.Second, ProgressTimeout: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	ln, err := srv.Listen("127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	hs := srv.HTTPServer(nil)
	go hs.Serve(ln)
	defer hs.Close()
	addr := ln.Addr().String()
	url := "http://" + addr

	// 40 connections that never send a byte: the server holds at most maxConns
	// of them (the rest wait in the backlog) and closes each after HeaderTimeout.
	fds0 := openFDs(t)
	var idle []net.Conn
	for range 40 {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		idle = append(idle, c)
	}
	time.Sleep(300 * time.Millisecond)
	if n := openFDs(t) - fds0; n > len(idle)+maxConns+4 {
		t.Errorf("%d descriptors for %d idle clients: the server holds more than %d", n, len(idle), maxConns)
	}
	c, err := laptop.NewClient(url, w.token, laptop.ClientOptions{})
	if err != nil {
		t.Fatal(err)
	}
	cctx, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	start := time.Now()
	if _, err := c.Desktop(cctx, w.desktop); err != nil {
		t.Fatalf("an authorized call behind %d idle clients: %v", len(idle), err)
	}
	t.Logf("authorized call answered after %v behind %d idle clients", time.Since(start).Round(time.Millisecond), len(idle))
	idle[0].SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := idle[0].Read(make([]byte, 1)); err == nil {
		t.Error("an idle client's connection is still open")
	}

	// A body that stalls: the request ends after ProgressTimeout.
	stalled := func(req string) time.Duration {
		t.Helper()
		conn, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		start := time.Now()
		fmt.Fprint(conn, req)
		conn.SetReadDeadline(time.Now().Add(15 * time.Second))
		io.Copy(io.Discard, conn) // the server's answer, if any, then EOF
		return time.Since(start)
	}
	body := fmt.Sprintf("POST /v1/checkins/%s/clusters HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n"+
		"Content-Type: application/octet-stream\r\nContent-Length: 1048576\r\n\r\nCVDSTRM1", strings.Repeat("a", 32), w.token)
	if d := stalled(body); d > 10*time.Second {
		t.Errorf("a stalled upload body held its connection %v", d)
	}

	// A stream the client never reads: the server gives up writing it.
	m, err := c.Checkout(ctx, w.desktop, 0)
	if err != nil {
		t.Fatal(err)
	}
	conn, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	fmt.Fprintf(conn, "GET /v1/layers/%s/clusters?from=0&lease=%s HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n\r\n", w.base, m.Lease.ID, w.token)
	br := bufio.NewReader(conn)
	resp, err := http.ReadResponse(br, nil)
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("stream: %v %v", resp, err)
	}
	// Read nothing more; the handler must end within a few progress timeouts.
	deadline := time.Now().Add(15 * time.Second)
	for {
		mresp, err := http.Get(url + "/metrics")
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(mresp.Body)
		mresp.Body.Close()
		if strings.Contains(string(b), `route="clusters"`) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("a stream nobody reads is still being written")
		}
		time.Sleep(200 * time.Millisecond)
	}
}
