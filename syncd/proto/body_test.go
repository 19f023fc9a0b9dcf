package proto

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"testing"
	"time"

	"github.com/cvd-project/cvd/internal/testutil"
)

// TestFuncBody: HTTP/1.1 sends a funcBody through WriteTo (no pipe); a reader
// gets the same bytes through Read; a request the server refuses before reading
// the body ends without the writer blocking; a body never sent never runs.
func TestFuncBody(t *testing.T) {
	payload := testutil.Fill(3, 3<<20, false)
	write := func(w io.Writer) error {
		for off := 0; off < len(payload); off += 100 << 10 {
			if _, err := w.Write(payload[off:min(off+100<<10, len(payload))]); err != nil {
				return err
			}
		}
		return nil
	}
	var got []byte
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/refuse" {
			w.WriteHeader(http.StatusForbidden)
			return
		}
		got, _ = io.ReadAll(r.Body)
	}))
	defer srv.Close()

	// Through WriteTo: the request's body is never Read.
	var reads int
	b := NewFuncBody(write)
	req, _ := http.NewRequest("POST", srv.URL+"/take", &readCounter{b, &reads})
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if err := b.Finish(); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, payload) {
		t.Fatalf("server got %d bytes, want %d", len(got), len(payload))
	}
	if reads != 0 {
		t.Errorf("the transport read the body %d times instead of calling WriteTo", reads)
	}

	// Read gives the same bytes.
	b = NewFuncBody(write)
	all, err := io.ReadAll(b)
	if err != nil || !bytes.Equal(all, payload) {
		t.Fatalf("Read: %d bytes, %v", len(all), err)
	}
	if err := b.Finish(); err != nil {
		t.Fatal(err)
	}

	// Refused early: finish returns, whatever the writer was doing.
	b = NewFuncBody(func(w io.Writer) error {
		for {
			if _, err := w.Write(payload); err != nil {
				return err
			}
		}
	})
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	req, _ = http.NewRequestWithContext(ctx, "POST", srv.URL+"/refuse", b)
	resp, err = http.DefaultClient.Do(req)
	if err == nil {
		resp.Body.Close()
		if resp.StatusCode != http.StatusForbidden {
			t.Errorf("status %d", resp.StatusCode)
		}
	}
	finished := make(chan error, 1)
	go func() { finished <- b.Finish() }()
	select {
	case <-finished:
	case <-time.After(15 * time.Second):
		t.Fatal("finish blocked after the server refused the request")
	}

	// Never sent: it never runs.
	ran := false
	b = NewFuncBody(func(io.Writer) error { ran = true; return nil })
	if err := b.Finish(); !errors.Is(err, ErrBodyNotRun) || ran {
		t.Errorf("finish of an unsent body: %v, ran %v", err, ran)
	}
	if _, err := b.WriteTo(io.Discard); !errors.Is(err, ErrBodyNotRun) || ran {
		t.Errorf("WriteTo after finish: %v, ran %v", err, ran)
	}
}

// readCounter passes WriteTo through and counts Reads.
type readCounter struct {
	b     *FuncBody
	reads *int
}

func (r *readCounter) Read(p []byte) (int, error)         { *r.reads++; return r.b.Read(p) }
func (r *readCounter) WriteTo(w io.Writer) (int64, error) { return r.b.WriteTo(w) }
