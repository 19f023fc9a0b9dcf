package laptop

import (
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/cvd-project/cvd/syncd/proto"
)

// Client talks to a sync server as one device.
type Client struct {
	base  *url.URL
	token string
	hc    *http.Client
	// Sent and Received count the HTTP body bytes of every request and response
	// (a client may serve several goroutines).
	Sent, Received atomic.Int64
	// peerPin is the SHA-256 of the public key of the https server's
	// certificate, as the last handshake saw it.
	peerPin atomic.Value
}

// ClientOptions controls NewClient.
type ClientOptions struct {
	// CACert is a PEM file of the certificate authorities to trust for an https
	// server, in addition to the system's.
	CACert string
	// Timeout bounds each request's wait for response headers (default 5 min: a
	// commit seals the layers before it answers).
	Timeout time.Duration
	// RateLimit caps the bytes per second the client moves, both ways together
	// (0: no cap).
	RateLimit int64
	// Pin, when set, is the hex SHA-256 of the public key (SubjectPublicKeyInfo)
	// the https server's certificate must have: a server showing another key
	// is refused (ErrPinMismatch), whatever CA signed it.
	Pin string
}

// ErrPinMismatch: the server's certificate is not the one pinned at check-out.
var ErrPinMismatch = errors.New("the server's certificate key changed since the check-out (pinned key mismatch)")

// NewClient makes a client for the server at rawURL (http or https) with a device
// token.
func NewClient(rawURL, token string, opts ClientOptions) (*Client, error) {
	u, err := url.Parse(strings.TrimRight(rawURL, "/"))
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return nil, fmt.Errorf("server URL %q: want http://HOST:PORT or https://HOST:PORT", rawURL)
	}
	if opts.Timeout == 0 {
		opts.Timeout = 5 * time.Minute
	}
	tr := &http.Transport{
		Proxy:                 http.ProxyFromEnvironment,
		DialContext:           (&net.Dialer{Timeout: 10 * time.Second, KeepAlive: 30 * time.Second}).DialContext,
		TLSHandshakeTimeout:   10 * time.Second,
		ResponseHeaderTimeout: opts.Timeout,
		MaxIdleConnsPerHost:   4,
		DisableCompression:    true, // cluster streams are compressed already
	}
	if opts.RateLimit > 0 {
		tr.DialContext = limitDial(tr.DialContext, opts.RateLimit)
	}
	if opts.CACert != "" {
		pem, err := os.ReadFile(opts.CACert)
		if err != nil {
			return nil, err
		}
		pool, err := x509.SystemCertPool()
		if err != nil || pool == nil {
			pool = x509.NewCertPool()
		}
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("%s: no PEM certificates", opts.CACert)
		}
		tr.TLSClientConfig = &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}
	}
	c := &Client{base: u, token: token, hc: &http.Client{Transport: tr}}
	if u.Scheme == "https" {
		if tr.TLSClientConfig == nil {
			tr.TLSClientConfig = &tls.Config{MinVersion: tls.VersionTLS12}
		}
		tr.TLSClientConfig.VerifyConnection = func(cs tls.ConnectionState) error {
			if len(cs.PeerCertificates) == 0 {
				return ErrPinMismatch
			}
			sum := sha256.Sum256(cs.PeerCertificates[0].RawSubjectPublicKeyInfo)
			got := hex.EncodeToString(sum[:])
			if opts.Pin != "" && got != opts.Pin {
				return fmt.Errorf("%w: server %s shows key %s, pinned %s", ErrPinMismatch, u.Host, got[:16], opts.Pin[:min(16, len(opts.Pin))])
			}
			c.peerPin.Store(got)
			return nil
		}
	}
	return c, nil
}

// PeerPin is the SHA-256 of the https server's certificate key as the last
// handshake saw it ("" before one, or over http): what a check-out pins.
func (c *Client) PeerPin() string {
	s, _ := c.peerPin.Load().(string)
	return s
}

// URL is the server's base URL.
func (c *Client) URL() string { return c.base.String() }

// APIError is an error the server answered.
type APIError struct {
	Status int
	Code   string
	Msg    string
	Lease  *proto.LeaseError
}

func (e *APIError) Error() string { return e.Msg }

// Unwrap gives the sentinel the code names, so errors.Is works across the wire.
func (e *APIError) Unwrap() []error {
	var out []error
	if s := proto.SentinelOf(e.Code); s != nil {
		out = append(out, s)
	}
	if e.Lease != nil {
		out = append(out, e.Lease)
	}
	return out
}

// retryable reports a transient failure worth another attempt.
func retryable(err error) bool {
	var ae *APIError
	if errors.As(err, &ae) {
		return ae.Status == http.StatusBadGateway || ae.Status == http.StatusServiceUnavailable || ae.Status == http.StatusGatewayTimeout
	}
	var ne net.Error
	return errors.As(err, &ne) || errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, syscall.ECONNRESET)
}

// attempts bounds every request loop of the client.
const attempts = 3

// call sends one request with a replayable body and decodes a JSON answer into
// out (when not nil). Transient failures are retried a bounded number of times.
func (c *Client) call(ctx context.Context, method, path string, body []byte, ctype string, out any) error {
	var err error
	for i := range attempts {
		if i > 0 {
			select {
			case <-ctx.Done():
				return ctx.Err()
			case <-time.After(time.Duration(i*i) * 200 * time.Millisecond):
			}
		}
		var rc io.ReadCloser
		rc, err = c.send(ctx, method, path, bodyReader(body), int64(len(body)), ctype)
		if err == nil {
			err = decodeBody(rc, out, &c.Received)
			rc.Close()
		}
		if err == nil || !retryable(err) || ctx.Err() != nil {
			return err
		}
	}
	return err
}

func bodyReader(b []byte) io.Reader {
	if b == nil {
		return nil
	}
	return bytes.NewReader(b)
}

func decodeBody(rc io.Reader, out any, count *atomic.Int64) error {
	b, err := io.ReadAll(io.LimitReader(rc, 64<<20))
	count.Add(int64(len(b)))
	if err != nil {
		return err
	}
	switch v := out.(type) {
	case nil:
		return nil
	case *[]byte:
		*v = b
		return nil
	}
	if err := json.Unmarshal(b, out); err != nil {
		return fmt.Errorf("decode the server's answer: %w", err)
	}
	return nil
}

// send issues a request and returns the body of a 2xx answer; other answers become
// *APIError.
func (c *Client) send(ctx context.Context, method, path string, body io.Reader, n int64, ctype string) (io.ReadCloser, error) {
	req, err := http.NewRequestWithContext(ctx, method, c.base.String()+path, body)
	if err != nil {
		return nil, err
	}
	req.Header.Set("Authorization", "Bearer "+c.token)
	req.Header.Set("User-Agent", "cvd-sync/1")
	if ctype != "" {
		req.Header.Set("Content-Type", ctype)
	}
	if n >= 0 && body != nil {
		req.ContentLength = n
	}
	resp, err := c.hc.Do(req)
	if n > 0 {
		c.Sent.Add(n)
	}
	if err != nil {
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		return nil, fmt.Errorf("%s %s: %w", method, c.base.Host, err)
	}
	if resp.StatusCode/100 == 2 {
		return resp.Body, nil
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	c.Received.Add(int64(len(b)))
	var eb proto.ErrorBody
	ae := &APIError{Status: resp.StatusCode}
	if json.Unmarshal(b, &eb) == nil && eb.Error != "" {
		ae.Code, ae.Msg, ae.Lease = eb.Code, "server: "+eb.Error, eb.Lease
		if ae.Lease != nil {
			ae.Lease.Err = proto.SentinelOf(eb.Code)
		}
	} else if resp.StatusCode == http.StatusBadRequest && bytes.Contains(b, []byte("HTTP request to an HTTPS server")) {
		ae.Msg = fmt.Sprintf("server %s speaks HTTPS: use https://%s (with --ca-cert when its certificate is not from a public CA)", c.base.Host, c.base.Host)
	} else {
		ae.Msg = fmt.Sprintf("server: %s %s: %s", method, path, resp.Status)
	}
	return nil, ae
}

func jsonBody(v any) []byte {
	b, err := json.Marshal(v)
	if err != nil {
		panic(err)
	}
	return b
}

// Desktop returns the desktop's versions and lease.
func (c *Client) Desktop(ctx context.Context, name string) (*proto.DesktopStatus, error) {
	var out proto.DesktopStatus
	return &out, c.call(ctx, "GET", "/v1/desktops/"+url.PathEscape(name), nil, "", &out)
}

// Manifest asks for the layers of the desktop's head version, without a lease
// (a host pulling them).
func (c *Client) Manifest(ctx context.Context, name string) (*proto.Manifest, error) {
	var out proto.Manifest
	return &out, c.call(ctx, "GET", "/v1/desktops/"+url.PathEscape(name)+"/manifest", nil, "", &out)
}

// Checkout asks for the desktop's lease and manifest; have lists layers the laptop
// holds (their clusters then come as references).
func (c *Client) Checkout(ctx context.Context, name string, ttl time.Duration, have ...string) (*proto.Manifest, error) {
	return c.CheckoutWith(ctx, name, proto.CheckoutRequest{TTLSeconds: int64(ttl / time.Second), Have: have})
}

// CheckoutWith is Checkout with the whole request.
func (c *Client) CheckoutWith(ctx context.Context, name string, req proto.CheckoutRequest) (*proto.Manifest, error) {
	var out proto.Manifest
	body := jsonBody(req)
	return &out, c.call(ctx, "POST", "/v1/desktops/"+url.PathEscape(name)+"/checkout", body, "application/json", &out)
}

// Renew extends the lease.
func (c *Client) Renew(ctx context.Context, name, lease string, ttl time.Duration, streaming bool) (*proto.Lease, error) {
	var out proto.Lease
	body := jsonBody(proto.LeaseRequest{Lease: lease, TTLSeconds: int64(ttl / time.Second), Stream: streaming})
	return &out, c.call(ctx, "POST", "/v1/desktops/"+url.PathEscape(name)+"/renew", body, "application/json", &out)
}

// Release gives the lease back.
func (c *Client) Release(ctx context.Context, name, lease string) error {
	body := jsonBody(proto.LeaseRequest{Lease: lease})
	return c.call(ctx, "POST", "/v1/desktops/"+url.PathEscape(name)+"/release", body, "application/json", nil)
}

// BootFile streams one of the files the desktop boots from.
func (c *Client) BootFile(ctx context.Context, name, sum string) (io.ReadCloser, error) {
	return c.send(ctx, "GET", "/v1/desktops/"+url.PathEscape(name)+"/boot/"+url.PathEscape(sum), nil, 0, "")
}

// Console tells the server where the console of the desktop this device was
// asked to run is (or why it could not run it).
func (c *Client) Console(ctx context.Context, name string, rep proto.ConsoleReport) error {
	return c.call(ctx, "PUT", "/v1/desktops/"+url.PathEscape(name)+"/console", jsonBody(rep), "application/json", nil)
}

// Report tells the server what this device runs and has staged of a desktop.
func (c *Client) Report(ctx context.Context, name string, rep proto.DeviceReport) error {
	return c.call(ctx, "PUT", "/v1/desktops/"+url.PathEscape(name)+"/device", jsonBody(rep), "application/json", nil)
}

// Open asks for the desktop's active role (see proto.OpenRequest).
func (c *Client) Open(ctx context.Context, name string, req proto.OpenRequest) (*proto.OpenAnswer, error) {
	var out proto.OpenAnswer
	return &out, c.call(ctx, "POST", "/v1/desktops/"+url.PathEscape(name)+"/open", jsonBody(req), "application/json", &out)
}

// Layer returns a layer's description.
func (c *Client) Layer(ctx context.Context, id string) (*proto.LayerInfo, error) {
	var out proto.LayerInfo
	return &out, c.call(ctx, "GET", "/v1/layers/"+id, nil, "", &out)
}

// Clusters opens the cluster stream of a layer from index from on; with the lease
// of a check-out that listed what the laptop holds, it may carry references.
func (c *Client) Clusters(ctx context.Context, id string, from int64, lease string) (io.ReadCloser, error) {
	q := fmt.Sprintf("/v1/layers/%s/clusters?from=%d", id, from)
	if lease != "" {
		q += "&lease=" + url.QueryEscape(lease)
	}
	return c.send(ctx, "GET", q, nil, -1, "")
}

// Entries opens a layer's entry list (proto.AppendEntry records).
func (c *Client) Entries(ctx context.Context, id string) (io.ReadCloser, error) {
	return c.send(ctx, "GET", "/v1/layers/"+id+"/entries", nil, -1, "")
}

// ReadClusters opens a cluster stream of the named clusters of a layer
// (ascending, at most proto.MaxRead).
func (c *Client) ReadClusters(ctx context.Context, id string, idxs []int64) (io.ReadCloser, error) {
	b := make([]byte, 0, 8*len(idxs))
	for _, i := range idxs {
		b = binary.BigEndian.AppendUint64(b, uint64(i))
	}
	return c.send(ctx, "POST", "/v1/layers/"+id+"/read", bytes.NewReader(b), int64(len(b)), "application/octet-stream")
}

// WorkingSet returns the clusters of a layer that devices read while booting.
func (c *Client) WorkingSet(ctx context.Context, id string) (*proto.WorkingSet, error) {
	var out proto.WorkingSet
	return &out, c.call(ctx, "GET", "/v1/layers/"+id+"/workingset", nil, "", &out)
}

// ReportWorkingSet adds what this device read of a layer while booting.
func (c *Client) ReportWorkingSet(ctx context.Context, id string, ws proto.WorkingSet) error {
	return c.call(ctx, "PUT", "/v1/layers/"+id+"/workingset", jsonBody(ws), "application/json", nil)
}

// OpenCheckin opens or resumes a check-in.
func (c *Client) OpenCheckin(ctx context.Context, req *proto.CheckinRequest) (*proto.CheckinStatus, error) {
	var out proto.CheckinStatus
	return &out, c.call(ctx, "POST", "/v1/checkins", jsonBody(req), "application/json", &out)
}

// PutEntries sends one disk's entry list.
func (c *Client) PutEntries(ctx context.Context, id, diskName string, list []byte) (*proto.CheckinStatus, error) {
	var out proto.CheckinStatus
	return &out, c.call(ctx, "PUT", "/v1/checkins/"+id+"/entries/"+diskName, list, "application/octet-stream", &out)
}

// Missing lists the clusters the server still needs.
func (c *Client) Missing(ctx context.Context, id string) ([]proto.MissingItem, error) {
	var b []byte
	if err := c.call(ctx, "GET", "/v1/checkins/"+id+"/missing", nil, "", &b); err != nil {
		return nil, err
	}
	var out []proto.MissingItem
	err := proto.ReadMissing(bytes.NewReader(b), func(m proto.MissingItem) error { out = append(out, m); return nil })
	return out, err
}

// Upload sends a cluster stream (not retried: the caller asks for what is missing
// and sends again).
func (c *Client) Upload(ctx context.Context, id string, body io.Reader) (*proto.UploadResult, error) {
	rc, err := c.send(ctx, "POST", "/v1/checkins/"+id+"/clusters", body, -1, "application/x-cvd-clusters")
	if err != nil {
		return nil, err
	}
	defer rc.Close()
	var out proto.UploadResult
	return &out, decodeBody(rc, &out, &c.Received)
}

// Commit asks the server to build and commit the version.
func (c *Client) Commit(ctx context.Context, id string) (*proto.CheckinResult, error) {
	var out proto.CheckinResult
	return &out, c.call(ctx, "POST", "/v1/checkins/"+id+"/commit", nil, "", &out)
}
