package syncd

import (
	"context"
	"crypto/tls"
	"errors"
	"net"
	"net/http/httptest"
	"os"
	"path/filepath"
	"testing"

	"github.com/cvd-project/cvd/syncd/laptop"
)

// keyPair is a fresh self-signed certificate for 127.0.0.1 and its PEM.
func keyPair(t *testing.T) (tls.Certificate, []byte) {
	t.Helper()
	certPEM, keyPEM := selfSigned(t)
	c, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		t.Fatal(err)
	}
	return c, certPEM
}

// The laptop pins the server's certificate key at its first check-out: a
// server that comes back with another key is refused, even one a trusted CA
// signed.
func TestCertificatePinned(t *testing.T) {
	ctx := context.Background()
	w := newWorld(t, smallSpec())
	w.http.Close()
	certA, pemA := keyPair(t)
	certB, pemB := keyPair(t)
	ca := filepath.Join(t.TempDir(), "ca.pem")
	if err := os.WriteFile(ca, append(append([]byte{}, pemA...), pemB...), 0o644); err != nil {
		t.Fatal(err)
	}
	serve := func(cert tls.Certificate, addr string) *httptest.Server {
		hs := httptest.NewUnstartedServer(w.srv.Handler())
		if addr != "" {
			ln, err := net.Listen("tcp", addr)
			if err != nil {
				t.Fatal(err)
			}
			hs.Listener.Close()
			hs.Listener = ln
		}
		hs.TLS = &tls.Config{Certificates: []tls.Certificate{cert}}
		hs.StartTLS()
		return hs
	}
	hs := serve(certA, "")
	c, err := laptop.NewClient(hs.URL, w.token, laptop.ClientOptions{CACert: ca})
	if err != nil {
		t.Fatal(err)
	}
	lap := newLaptop(t, "lap")
	if _, err := lap.lp.CheckOut(ctx, c, w.desktop, laptop.CheckoutOptions{CACert: ca}); err != nil {
		t.Fatal(err)
	}
	co, err := lap.lp.Checkout(w.desktop)
	if err != nil {
		t.Fatal(err)
	}
	if len(co.Pin) != 64 {
		t.Fatalf("pin %q", co.Pin)
	}
	if _, err := lap.lp.Renew(ctx, w.desktop, 0); err != nil {
		t.Fatalf("renew with the same certificate: %v", err)
	}
	addr := hs.Listener.Addr().String()
	hs.Close()
	hs = serve(certB, addr)
	defer hs.Close()
	if _, err := lap.lp.Renew(ctx, w.desktop, 0); !errors.Is(err, laptop.ErrPinMismatch) {
		t.Fatalf("renew against another certificate key: %v, want ErrPinMismatch", err)
	}
	// A client without the pin (a CA-only check) would have accepted it.
	c2, _ := laptop.NewClient(hs.URL, w.token, laptop.ClientOptions{CACert: ca})
	if _, err := c2.Manifest(ctx, w.desktop); err != nil {
		t.Fatalf("the second certificate is trusted by the CA file: %v", err)
	}
}
