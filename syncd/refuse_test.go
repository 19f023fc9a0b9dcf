package syncd

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/cvd-project/cvd/desktop"
	"github.com/cvd-project/cvd/syncd/laptop"

	"github.com/cvd-project/cvd/syncd/state"

	"github.com/cvd-project/cvd/disk"
	"github.com/cvd-project/cvd/images"
	"github.com/cvd-project/cvd/internal/testutil"
	"github.com/cvd-project/cvd/syncd/proto"
	"github.com/cvd-project/cvd/vm"
)

// smallSpec is a desktop small enough for the refusal tests.
func smallSpec() worldSpec {
	return worldSpec{
		baseSize:   256 * MiB,
		baseWrites: []write{{off: 0, data: testutil.Fill(1, 8*MiB, false)}},
		appWrites:  []write{{off: 32 * MiB, data: testutil.Fill(3, 2*MiB, false)}},
		userSize:   64 * MiB,
	}
}

// snapshot is what "no change on the server" compares: the head, the versions,
// the layers, the lease.
type snapshot struct {
	head     int
	versions int
	layers   []string
	lease    string
}

func (w *world) snap() snapshot {
	w.t.Helper()
	st, err := w.srv.DesktopStatus(w.desktop)
	if err != nil {
		w.t.Fatal(err)
	}
	ls, err := w.store.Layers()
	if err != nil {
		w.t.Fatal(err)
	}
	s := snapshot{head: st.Head, versions: len(st.Versions)}
	for _, l := range ls {
		s.layers = append(s.layers, l.ID)
	}
	slices.Sort(s.layers)
	if st.Lease != nil {
		s.lease = st.Lease.ID + "/" + st.Lease.DeviceName
	}
	return s
}

func (w *world) unchanged(before snapshot, what string) {
	w.t.Helper()
	after := w.snap()
	if after.head != before.head || after.versions != before.versions || !slices.Equal(after.layers, before.layers) || after.lease != before.lease {
		w.t.Errorf("%s changed the server: %+v → %+v", what, before, after)
	}
}

func writeTop(t *testing.T, lap *testLaptop, desktop, diskName string, ws []write) {
	t.Helper()
	img, err := disk.Open(lap.top(desktop, diskName), disk.OpenOptions{AllowedRoots: []string{lap.dir}})
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	applyWrites(t, img, ws)
}

func TestRefusedWrongToken(t *testing.T) {
	ctx := context.Background()
	w := newWorld(t, smallSpec())
	before := w.snap()
	id, _ := parseToken(w.token)
	for _, tok := range []string{
		proto.TokenPrefix + id + "_" + strings.Repeat("A", 43), // right device, wrong secret
		proto.TokenPrefix + "0123456789abcdef_" + strings.Repeat("B", 43),
		"not-a-token",
		"",
	} {
		_, err := w.client(tok).Checkout(ctx, w.desktop, 0)
		if !errors.Is(err, proto.ErrUnauthorized) {
			t.Errorf("token %q: %v, want ErrUnauthorized", tok, err)
		}
	}
	w.unchanged(before, "wrong tokens")
	// A device not bound to the desktop.
	_, other, err := w.srv.AddDevice("stranger", DeviceOptions{})
	if err != nil {
		t.Fatal(err)
	}
	before = w.snap()
	if _, err := w.client(other).Checkout(ctx, w.desktop, 0); !errors.Is(err, proto.ErrForbidden) {
		t.Errorf("unbound device: %v, want ErrForbidden", err)
	}
	w.unchanged(before, "an unbound device")
	// A removed device's token stops working.
	if _, err := w.srv.RemoveDevice("stranger"); err != nil {
		t.Fatal(err)
	}
	if _, err := w.client(other).Desktop(ctx, w.desktop); !errors.Is(err, proto.ErrUnauthorized) {
		t.Errorf("removed device: %v, want ErrUnauthorized", err)
	}
}

func TestRefusedOtherDevicesLease(t *testing.T) {
	ctx := context.Background()
	w := newWorld(t, smallSpec())
	lap := newLaptop(t, "laptop")
	if _, err := lap.lp.CheckOut(ctx, w.client(w.token), w.desktop, laptop.CheckoutOptions{}); err != nil {
		t.Fatal(err)
	}
	_, tok2, err := w.srv.AddDevice("laptop2", DeviceOptions{Desktops: []string{w.desktop}})
	if err != nil {
		t.Fatal(err)
	}
	before := w.snap()
	lap2 := newLaptop(t, "laptop2")
	_, err = lap2.lp.CheckOut(ctx, w.client(tok2), w.desktop, laptop.CheckoutOptions{})
	var le *proto.LeaseError
	if !errors.Is(err, proto.ErrLeaseHeld) || !errors.As(err, &le) || le.Holder != "laptop1" || !strings.Contains(err.Error(), "laptop1") {
		t.Fatalf("second device: %v, want ErrLeaseHeld naming laptop1", err)
	}
	t.Logf("refused: %v", err)
	w.unchanged(before, "another device's check-out")
	// Nor can it renew or release the holder's lease.
	co, _ := lap.lp.Checkout(w.desktop)
	if _, err := w.client(tok2).Renew(ctx, w.desktop, co.Lease.ID, 0, false); !errors.Is(err, proto.ErrLeaseHeld) {
		t.Errorf("renew by another device: %v", err)
	}
	if err := w.client(tok2).Release(ctx, w.desktop, co.Lease.ID); !errors.Is(err, proto.ErrLeaseHeld) {
		t.Errorf("release by another device: %v", err)
	}
	w.unchanged(before, "another device's renew and release")
}

func TestRefusedExpiredLease(t *testing.T) {
	ctx := context.Background()
	w := newWorld(t, smallSpec())
	lap := newLaptop(t, "laptop")
	if _, err := lap.lp.CheckOut(ctx, w.client(w.token), w.desktop, laptop.CheckoutOptions{TTL: time.Hour}); err != nil {
		t.Fatal(err)
	}
	writeTop(t, lap, w.desktop, proto.DiskSystem, []write{{off: 0, data: testutil.Fill(7, 1*MiB, false)}})
	w.now = w.now.Add(2 * time.Hour) // the server's clock: the lease is past its expiry
	before := w.snap()
	_, err := lap.lp.CheckIn(ctx, w.desktop, laptop.CheckinOptions{})
	if !errors.Is(err, proto.ErrLeaseExpired) {
		t.Fatalf("check-in after expiry: %v, want ErrLeaseExpired", err)
	}
	t.Logf("refused: %v", err)
	w.unchanged(before, "a check-in with an expired lease")
	co, _ := lap.lp.Checkout(w.desktop)
	if _, err := w.client(w.token).Renew(ctx, w.desktop, co.Lease.ID, 0, false); !errors.Is(err, proto.ErrLeaseExpired) {
		t.Errorf("renew after expiry: %v", err)
	}
	w.unchanged(before, "a renew of an expired lease")
}

// tamperProxy forwards to target and flips a byte of the first data frame's
// payload in cluster streams.
func tamperProxy(t *testing.T, target string) *httptest.Server {
	u, _ := url.Parse(target)
	rp := httputil.NewSingleHostReverseProxy(u)
	var done atomic.Bool
	rp.ModifyResponse = func(r *http.Response) error {
		if !strings.HasSuffix(r.Request.URL.Path, "/clusters") || r.StatusCode != 200 || done.Load() {
			return nil
		}
		b, err := io.ReadAll(r.Body)
		if err != nil {
			return err
		}
		// magic, header, digest: the payload starts at 8+24+32.
		if len(b) > 8+24+32+10 && b[8] == proto.KindData {
			b[8+24+32+5] ^= 0xff
			done.Store(true)
		}
		r.Body = io.NopCloser(bytes.NewReader(b))
		r.ContentLength = int64(len(b))
		r.Header.Del("Content-Length")
		return nil
	}
	s := httptest.NewServer(rp)
	t.Cleanup(s.Close)
	return s
}

func TestRefusedTamperedCluster(t *testing.T) {
	ctx := context.Background()
	w := newWorld(t, smallSpec())

	// On the way down: a check-out through a proxy that alters a cluster.
	before := w.snap()
	lap := newLaptop(t, "laptop")
	proxy := tamperProxy(t, w.http.URL)
	c, _ := laptop.NewClient(proxy.URL, w.token, laptop.ClientOptions{})
	_, err := lap.lp.CheckOut(ctx, c, w.desktop, laptop.CheckoutOptions{})
	if !errors.Is(err, proto.ErrDigestMismatch) {
		t.Fatalf("tampered check-out: %v, want ErrDigestMismatch", err)
	}
	t.Logf("refused: %v", err)
	w.unchanged(before, "a tampered check-out") // and the lease it took went back
	if ls, _ := lap.store.Layers(); len(ls) != 0 {
		t.Errorf("the laptop imported %d layers from a tampered stream", len(ls))
	}

	// On the way up: an upload whose cluster does not match its digest.
	if _, err := lap.lp.CheckOut(ctx, w.client(w.token), w.desktop, laptop.CheckoutOptions{}); err != nil {
		t.Fatal(err)
	}
	writeTop(t, lap, w.desktop, proto.DiskSystem, []write{{off: 64 * MiB, data: testutil.Fill(8, 1*MiB, false)}})
	co, _ := lap.lp.Checkout(w.desktop)
	prep, err := lap.lp.PrepareCheckin(ctx, w.desktop)
	if err != nil {
		t.Fatal(err)
	}
	req := prep.Request
	cl := w.client(w.token)
	if _, err := cl.OpenCheckin(ctx, req); err != nil {
		t.Fatal(err)
	}
	for dn, list := range prep.Lists {
		if _, err := cl.PutEntries(ctx, req.ID, dn, list); err != nil {
			t.Fatal(err)
		}
	}
	miss, err := cl.Missing(ctx, req.ID)
	if err != nil || len(miss) != 16 {
		t.Fatalf("missing %d, %v", len(miss), err)
	}
	before = w.snap()
	raw := testutil.Fill(8, 64*KiB, false)
	ec, _ := proto.EncodeCluster(miss[0].Disk, miss[0].Index, raw, nil, proto.EncodeOptions{})
	ec.Data = append([]byte(nil), ec.Data...)
	ec.Data[100] ^= 1 // the digest still names the original
	var body bytes.Buffer
	sw := proto.NewStreamWriter(&body)
	sw.Data(ec)
	sw.End(1, nil)
	_, err = cl.Upload(ctx, req.ID, &body)
	if !errors.Is(err, proto.ErrDigestMismatch) {
		t.Fatalf("tampered upload: %v, want ErrDigestMismatch", err)
	}
	t.Logf("refused: %v", err)
	if m2, _ := cl.Missing(ctx, req.ID); len(m2) != len(miss) {
		t.Errorf("after a tampered upload %d clusters missing, want %d: the bad one was kept", len(m2), len(miss))
	}
	if _, err := cl.Commit(ctx, req.ID); !errors.Is(err, proto.ErrIncomplete) {
		t.Errorf("commit after a tampered upload: %v, want ErrIncomplete", err)
	}
	w.unchanged(before, "a tampered upload")
	// The honest client finishes the same check-in.
	rep, err := lap.lp.CheckIn(ctx, w.desktop, laptop.CheckinOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if rep.Sent != 16 || rep.Version != co.Version+1 {
		t.Errorf("sent %d clusters, version %d", rep.Sent, rep.Version)
	}
}

func TestRefusedMalformedRequests(t *testing.T) {
	ctx := context.Background()
	w := newWorld(t, smallSpec())
	lap := newLaptop(t, "laptop")
	if _, err := lap.lp.CheckOut(ctx, w.client(w.token), w.desktop, laptop.CheckoutOptions{}); err != nil {
		t.Fatal(err)
	}
	writeTop(t, lap, w.desktop, proto.DiskSystem, []write{{off: 64 * MiB, data: testutil.Fill(8, 1*MiB, false)}})
	prep, err := lap.lp.PrepareCheckin(ctx, w.desktop)
	if err != nil {
		t.Fatal(err)
	}
	good := prep.Request
	before := w.snap()

	do := func(method, path, ctype string, body []byte) (int, string) {
		req, _ := http.NewRequest(method, w.http.URL+path, bytes.NewReader(body))
		req.Header.Set("Authorization", "Bearer "+w.token)
		if ctype != "" {
			req.Header.Set("Content-Type", ctype)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	bad := func(req proto.CheckinRequest) []byte { b, _ := json.Marshal(req); return b }
	cases := []struct {
		name, method, path, ctype string
		body                      []byte
	}{
		{"checkout: not JSON", "POST", "/v1/desktops/desk/checkout", "application/json", []byte("{nope")},
		{"checkout: unknown field", "POST", "/v1/desktops/desk/checkout", "application/json", []byte(`{"ttl_seconds":1,"x":2}`)},
		{"checkout: trailing data", "POST", "/v1/desktops/desk/checkout", "application/json", []byte(`{} {}`)},
		{"checkout: wrong type", "POST", "/v1/desktops/desk/checkout", "text/plain", []byte(`{}`)},
		{"checkout: huge wrong type", "POST", "/v1/desktops/desk/checkout", "text/" + strings.Repeat("x", 60000), []byte(`{}`)},
		{"checkout: negative ttl", "POST", "/v1/desktops/desk/checkout", "application/json", []byte(`{"ttl_seconds":-5}`)},
		{"checkout: absurd ttl", "POST", "/v1/desktops/desk/checkout", "application/json", []byte(`{"ttl_seconds":10000000000}`)},
		{"checkout: body over 1 MiB", "POST", "/v1/desktops/desk/checkout", "application/json", append([]byte(`{"ttl_seconds":`), bytes.Repeat([]byte("1"), 2<<20)...)},
		{"desktop: bad name", "POST", "/v1/desktops/..%2Fetc/checkout", "application/json", []byte(`{}`)},
		{"layer: bad id", "GET", "/v1/layers/../../etc/passwd", "", nil},
		{"layer: short id", "GET", "/v1/layers/abcd/clusters", "", nil},
		{"layer: bad from", "GET", "/v1/layers/" + w.base + "/clusters?from=-3", "", nil},
		{"check-in: bad id", "POST", "/v1/checkins", "application/json", bad(func() proto.CheckinRequest { r := *good; r.ID = "../x"; return r }())},
		{"check-in: huge id", "POST", "/v1/checkins", "application/json", bad(func() proto.CheckinRequest {
			r := *good
			r.ID = strings.Repeat("z", 500000)
			return r
		}())},
		{"check-in: no disks", "POST", "/v1/checkins", "application/json", bad(func() proto.CheckinRequest { r := *good; r.Disks = nil; return r }())},
		{"check-in: bad cluster size", "POST", "/v1/checkins", "application/json", bad(func() proto.CheckinRequest {
			r := *good
			r.Disks = slices.Clone(r.Disks)
			r.Disks[0].ClusterSize = 3000
			return r
		}())},
		{"check-in: more entries than clusters", "POST", "/v1/checkins", "application/json", bad(func() proto.CheckinRequest {
			r := *good
			r.Disks = slices.Clone(r.Disks)
			r.Disks[0].Entries = 1 << 40
			return r
		}())},
		{"check-in: unknown disk", "POST", "/v1/checkins", "application/json", bad(func() proto.CheckinRequest {
			r := *good
			r.Disks = slices.Clone(r.Disks)
			r.Disks[0].Name = "swap"
			return r
		}())},
		{"check-in: missing", "GET", "/v1/checkins/" + strings.Repeat("a", 32) + "/missing", "", nil},
	}
	for _, c := range cases {
		code, body := do(c.method, c.path, c.ctype, c.body)
		if code != http.StatusBadRequest && code != http.StatusNotFound {
			t.Errorf("%s: HTTP %d %s, want 400 or 404", c.name, code, body)
		} else if !strings.Contains(body, `"code"`) && code != http.StatusNotFound {
			t.Errorf("%s: no JSON error body: %s", c.name, body)
		}
		if len(body) > 2048 {
			t.Errorf("%s: an error body of %d bytes echoes the input", c.name, len(body))
		}
	}
	w.unchanged(before, "malformed requests")

	// A well-formed check-in, then malformed lists and streams.
	cl := w.client(w.token)
	if _, err := cl.OpenCheckin(ctx, good); err != nil {
		t.Fatal(err)
	}
	list := prep.Lists[proto.DiskSystem]
	for _, c := range []struct {
		name string
		body []byte
	}{
		{"entry list truncated", list[:len(list)-5]},
		{"entry list with an extra entry", append(slices.Clone(list), proto.AppendEntry(nil, proto.Entry{Index: 4000})...)},
		{"entry list out of order", func() []byte {
			b := slices.Clone(list)
			copy(b[:41], list[41:82])
			copy(b[41:82], list[:41])
			return b
		}()},
		{"entry list of other content", func() []byte {
			b := slices.Clone(list)
			b[20] ^= 1
			return b
		}()},
	} {
		if _, err := cl.PutEntries(ctx, good.ID, proto.DiskSystem, c.body); !errors.Is(err, proto.ErrBadRequest) {
			t.Errorf("%s: %v, want ErrBadRequest", c.name, err)
		}
	}
	for dn, l := range prep.Lists {
		if _, err := cl.PutEntries(ctx, good.ID, dn, l); err != nil {
			t.Fatal(err)
		}
	}
	miss, _ := cl.Missing(ctx, good.ID)
	if len(miss) == 0 {
		t.Fatal("nothing missing")
	}
	raw := testutil.Fill(8, 64*KiB, false)
	for _, c := range []struct {
		name string
		body func() []byte
	}{
		{"garbage", func() []byte { return []byte("hello, this is not a cluster stream at all") }},
		{"truncated stream", func() []byte {
			var b bytes.Buffer
			sw := proto.NewStreamWriter(&b)
			ec, _ := proto.EncodeCluster(miss[0].Disk, miss[0].Index, raw, nil, proto.EncodeOptions{Compress: true})
			sw.Data(ec)
			sw.Flush()
			return b.Bytes()
		}},
		{"cluster not in the list", func() []byte {
			var b bytes.Buffer
			sw := proto.NewStreamWriter(&b)
			ec, _ := proto.EncodeCluster(0, 5, raw, nil, proto.EncodeOptions{Compress: true})
			sw.Data(ec)
			sw.End(1, nil)
			return b.Bytes()
		}},
		{"oversized frame", func() []byte {
			var b bytes.Buffer
			sw := proto.NewStreamWriter(&b)
			f := proto.Frame{Kind: proto.KindData, PLen: 1 << 30, Idx: miss[0].Index, N: 1 << 30}
			var h [proto.FrameHeader]byte
			f.Put(h[:])
			sw.WriteRaw(h[:])
			sw.Flush()
			return b.Bytes()
		}},
		{"zero frame in an upload", func() []byte {
			var b bytes.Buffer
			sw := proto.NewStreamWriter(&b)
			sw.Zeros(0, 1, 1)
			sw.End(1, nil)
			return b.Bytes()
		}},
	} {
		if _, err := cl.Upload(ctx, good.ID, bytes.NewReader(c.body())); !errors.Is(err, proto.ErrBadRequest) {
			t.Errorf("%s: %v, want ErrBadRequest", c.name, err)
		}
	}
	if _, err := cl.Commit(ctx, good.ID); !errors.Is(err, proto.ErrIncomplete) {
		t.Errorf("early commit: %v, want ErrIncomplete", err)
	}
	w.unchanged(before, "malformed lists and streams")
	if _, err := lap.lp.CheckIn(ctx, w.desktop, laptop.CheckinOptions{}); err != nil {
		t.Fatalf("the check-in after the malformed ones: %v", err)
	}
}

// mountTmpfs mounts a tmpfs of size bytes at a new directory (root only).
func mountTmpfs(t *testing.T, size int64) string {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "fs")
	os.MkdirAll(dir, 0o755)
	out, err := exec.Command("mount", "-t", "tmpfs", "-o", fmt.Sprintf("size=%d", size), "tmpfs", dir).CombinedOutput()
	if err != nil {
		if testutil.Required("root") {
			t.Fatalf("mount tmpfs: %v %s", err, out)
		}
		t.Skipf("cannot mount a tmpfs (needs root): %v %s", err, out)
	}
	t.Cleanup(func() { exec.Command("umount", "-l", dir).Run() })
	return dir
}

func TestRefusedFullDiskServer(t *testing.T) {
	ctx := context.Background()
	spec := smallSpec()
	spec.baseWrites = []write{{off: 0, data: testutil.Fill(1, 2*MiB, false)}}
	spec.appWrites = []write{{off: 32 * MiB, data: testutil.Fill(3, 1*MiB, false)}}
	fs := mountTmpfs(t, 40*MiB)
	w := newWorldAt(t, filepath.Join(fs, "server"), spec)
	lap := newLaptop(t, "laptop")
	if _, err := lap.lp.CheckOut(ctx, w.client(w.token), w.desktop, laptop.CheckoutOptions{}); err != nil {
		t.Fatal(err)
	}
	// More than the server has room for: refused before anything is sent.
	writeTop(t, lap, w.desktop, proto.DiskSystem, []write{{off: 64 * MiB, data: testutil.Fill(9, 48*MiB, false)}})
	before := w.snap()
	_, err := lap.lp.CheckIn(ctx, w.desktop, laptop.CheckinOptions{})
	if !errors.Is(err, proto.ErrNoSpace) {
		t.Fatalf("check-in to a full server: %v, want ErrNoSpace", err)
	}
	t.Logf("refused: %v", err)
	w.unchanged(before, "a check-in to a full server")

	// Room at the start, none in the middle: the file system fills up while the
	// clusters arrive.
	lap2 := newLaptop(t, "laptop2")
	_, tok2, _ := w.srv.AddDevice("laptop2", DeviceOptions{Desktops: []string{w.desktop}})
	w.srv.BreakLease(w.desktop)
	if _, err := lap2.lp.CheckOut(ctx, w.client(tok2), w.desktop, laptop.CheckoutOptions{}); err != nil {
		t.Fatal(err)
	}
	writeTop(t, lap2, w.desktop, proto.DiskSystem, []write{{off: 64 * MiB, data: testutil.Fill(10, 6*MiB, false)}})
	before = w.snap()
	filler := filepath.Join(fs, "filler")
	lap2.reopen(laptop.LaptopOptions{Progress: &fillOnProgress{path: filler, after: 2 * MiB}})
	_, err = lap2.lp.CheckIn(ctx, w.desktop, laptop.CheckinOptions{})
	if !errors.Is(err, proto.ErrNoSpace) {
		t.Fatalf("check-in filling the server's disk: %v, want ErrNoSpace", err)
	}
	t.Logf("refused: %v", err)
	w.unchanged(before, "a check-in that filled the server's disk")
	// With room again, the same check-in resumes and completes.
	os.Remove(filler)
	lap2.reopen(laptop.LaptopOptions{})
	rep, err := lap2.lp.CheckIn(ctx, w.desktop, laptop.CheckinOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if !rep.Resumed || rep.Payload > 6*MiB+64*KiB {
		t.Errorf("resumed %v, payload %d: want a resumed check-in sending at most what was missing", rep.Resumed, rep.Payload)
	}
}

// fillOnProgress fills the file system of path once after bytes have moved,
// leaving leave bytes free.
type fillOnProgress struct {
	path  string
	after int64
	leave int64
	n     int64
	done  bool
}

func (p *fillOnProgress) Start(string, int64) {}
func (p *fillOnProgress) Done()               {}
func (p *fillOnProgress) Add(n int64) {
	p.n += n
	if p.n >= p.after && !p.done {
		p.done = true
		f, err := os.Create(p.path)
		if err != nil {
			return
		}
		buf := make([]byte, 1<<20)
		for {
			if _, err := f.Write(buf); err != nil {
				break
			}
		}
		if fi, err := f.Stat(); err == nil && p.leave > 0 {
			f.Truncate(max(0, fi.Size()-p.leave))
		}
		f.Close()
	}
}

// TestFullDiskInMidUpload: the server's file system fills up while a check-in's
// clusters arrive (after 2 MiB of 12) or as the last ones arrive (before the
// commit), with nothing or a few MiB left (so that a write of data clusters,
// not only of metadata, runs out of room). Once room returns, the same server
// (no restart) completes the check-in, and the layer it committed holds what
// the laptop wrote, cluster for cluster.
func TestFullDiskInMidUpload(t *testing.T) {
	for _, c := range []struct{ after, leave int64 }{
		{2 * MiB, 0}, {2 * MiB, 1*MiB + 4*KiB}, {2 * MiB, 3 * MiB}, {2 * MiB, 5*MiB + 12*KiB},
		{12 * MiB, 0}, {12 * MiB, 64 * KiB}, {12 * MiB, 3 * MiB},
	} {
		after, leave := c.after, c.leave
		t.Run(fmt.Sprintf("after=%d,leave=%d", after, leave), func(t *testing.T) {
			ctx := context.Background()
			fs := mountTmpfs(t, 48*MiB)
			w := newWorldAt(t, filepath.Join(fs, "server"), smallSpec())
			lap := newLaptop(t, "laptop")
			if _, err := lap.lp.CheckOut(ctx, w.client(w.token), w.desktop, laptop.CheckoutOptions{}); err != nil {
				t.Fatal(err)
			}
			writeTop(t, lap, w.desktop, proto.DiskSystem, []write{{off: 64 * MiB, data: testutil.Fill(uint64(leave), 12*MiB, false)}})
			filler := filepath.Join(fs, "filler")
			lap.reopen(laptop.LaptopOptions{Progress: &fillOnProgress{path: filler, after: after, leave: leave}})
			rep, err := lap.lp.CheckIn(ctx, w.desktop, laptop.CheckinOptions{})
			t.Logf("with %d bytes left: %v", leave, err)
			if err != nil && !errors.Is(err, proto.ErrNoSpace) {
				t.Fatalf("check-in filling the server's disk: %v, want ErrNoSpace", err)
			}
			os.Remove(filler)
			if err != nil {
				lap.reopen(laptop.LaptopOptions{})
				if rep, err = lap.lp.CheckIn(ctx, w.desktop, laptop.CheckinOptions{}); err != nil {
					t.Fatalf("the check-in once room returned: %v", err)
				}
			}
			id := rep.Layers[proto.DiskSystem]
			_, head := w.head()
			if head.System != id {
				t.Fatalf("head system %s, want %s", head.System, id)
			}
			qemuCompare(t, w.store.LayerPath(id), lap.store.LayerPath(id))
		})
	}
}

func TestRefusedFullDiskLaptop(t *testing.T) {
	ctx := context.Background()
	spec := smallSpec()
	spec.baseWrites = []write{{off: 0, data: testutil.Fill(1, 48*MiB, false)}}
	w := newWorld(t, spec)
	fs := mountTmpfs(t, 32*MiB)
	before := w.snap()
	lap := openLaptopAt(t, filepath.Join(fs, "laptop"))
	_, err := lap.lp.CheckOut(ctx, w.client(w.token), w.desktop, laptop.CheckoutOptions{})
	if !errors.Is(err, proto.ErrNoSpace) {
		t.Fatalf("check-out to a full laptop: %v, want ErrNoSpace", err)
	}
	t.Logf("refused: %v", err)
	w.unchanged(before, "a check-out to a full laptop") // the lease went back

	// Room at the start, none in the middle.
	fs2 := mountTmpfs(t, 128*MiB)
	lap2 := openLaptopAt(t, filepath.Join(fs2, "laptop"))
	lap2.reopen(laptop.LaptopOptions{Progress: &fillOnProgress{path: filepath.Join(fs2, "filler"), after: 8 * MiB}})
	_, err = lap2.lp.CheckOut(ctx, w.client(w.token), w.desktop, laptop.CheckoutOptions{})
	if !errors.Is(err, proto.ErrNoSpace) {
		t.Fatalf("check-out filling the laptop's disk: %v, want ErrNoSpace", err)
	}
	t.Logf("refused: %v", err)
	w.unchanged(before, "a check-out that filled the laptop's disk")
	if ds, _ := lap2.store.Desktops(); len(ds) != 0 {
		t.Errorf("the full laptop has desktops %v", ds)
	}
}

func TestExpiredCopyPurgedOffline(t *testing.T) {
	ctx := context.Background()
	w := newWorld(t, smallSpec())
	lap := newLaptop(t, "laptop")
	w.now = time.Now()
	rep, err := lap.lp.CheckOut(ctx, w.client(w.token), w.desktop, laptop.CheckoutOptions{TTL: 2 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	writeTop(t, lap, w.desktop, proto.DiskSystem, []write{{off: 0, data: testutil.Fill(7, 1*MiB, false)}})
	w.stop() // the server is gone
	lap.close()
	// Not expired yet: nothing happens.
	if purged, err := purgeAt(t, lap.dir, laptop.LaptopOptions{}); err != nil || len(purged) != 0 {
		t.Fatalf("purge before expiry: %v %v", purged, err)
	}
	time.Sleep(time.Until(rep.Lease.Expires) + 100*time.Millisecond)
	vm := &recordVM{}
	purged, err := purgeAt(t, lap.dir, laptop.LaptopOptions{VM: vm})
	if err != nil || len(purged) != 1 || purged[0].Desktop != w.desktop {
		t.Fatalf("purge after expiry: %v %v", purged, err)
	}
	if len(vm.undefined) != 1 || vm.undefined[0] != w.desktop {
		t.Errorf("the purge undefined the local VMs %v, want [%s]", vm.undefined, w.desktop)
	}
	st, err := images.Open(lap.dir, images.OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	if _, err := st.Desktop(w.desktop); !errors.Is(err, images.ErrNotFound) {
		t.Errorf("desktop after purge: %v", err)
	}
	for _, f := range []string{"desktops/desk.system.qcow2", "desktops/desk.user.qcow2"} {
		if exists(st.Path(f)) {
			t.Errorf("%s is still there", f)
		}
	}
	if ls, _ := st.Layers(); len(ls) == 0 {
		t.Log("no layers")
	} else {
		for _, l := range ls {
			if len(l.Names) > 0 {
				t.Errorf("layer %s keeps names %v after the purge", state.Short(l.ID), l.Names)
			}
		}
	}
	if rep, err := st.GC(ctx, false); err != nil || rep.Kept != 0 {
		t.Errorf("gc after the purge: kept %d, %v", rep.Kept, err)
	}
}

// recordVM is a LocalVM that records what it is asked to define and undefine.
type recordVM struct {
	defined   []vm.DesktopVM
	undefined []string
}

func (v *recordVM) DefineDesktop(ctx context.Context, d vm.DesktopVM) error {
	v.defined = append(v.defined, d)
	return nil
}

func (v *recordVM) UndefineDesktop(ctx context.Context, desktop string) error {
	v.undefined = append(v.undefined, desktop)
	return nil
}

// purgeAt is PurgeExpired on the store in dir, opened read-only as a listing
// command opens it.
func purgeAt(t *testing.T, dir string, opts laptop.LaptopOptions) ([]laptop.PurgeReport, error) {
	t.Helper()
	st, err := images.Open(dir, images.OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	return laptop.PurgeExpired(context.Background(), st, opts)
}

// TestLeaseTTLClamped: a lease asked for longer than the server's maximum gets
// the maximum, at a check-out and at a renewal (not a length that overflows into
// the past).
func TestLeaseTTLClamped(t *testing.T) {
	ctx := context.Background()
	w := newWorld(t, smallSpec())
	c := w.client(w.token)
	long := 20 * 365 * 24 * time.Hour
	m, err := c.Checkout(ctx, w.desktop, long)
	if err != nil {
		t.Fatal(err)
	}
	limit := w.now.Add(30 * 24 * time.Hour) // ServerOptions.MaxLeaseTTL's default
	if !m.Lease.Expires.After(w.now) || m.Lease.Expires.After(limit) {
		t.Errorf("check-out for 20 years: lease expires %s (now %s)", m.Lease.Expires, w.now)
	}
	l, err := c.Renew(ctx, w.desktop, m.Lease.ID, long, false)
	if err != nil {
		t.Fatal(err)
	}
	if !l.Expires.After(w.now) || l.Expires.After(limit) {
		t.Errorf("renewal for 20 years: lease expires %s (now %s)", l.Expires, w.now)
	}
}

// TestForeignLayers: a device learns nothing about desktops it is not bound to.
// A check-in whose parent is another desktop's layer gets the answer an unknown
// layer gets and commits nothing; that layer cannot be read; and a cluster that
// only another desktop holds is asked for (the dedup answer is no oracle).
func TestForeignLayers(t *testing.T) {
	ctx := context.Background()
	w := newWorld(t, smallSpec())
	// Another desktop, with a version layer of its own the device is not bound to.
	if _, err := desktop.Create(ctx, w.store, "secret", images.DesktopSpec{Base: w.base}); err != nil {
		t.Fatal(err)
	}
	secretData := testutil.Fill(77, 1*MiB, false)
	d, err := w.store.Desktop("secret")
	if err != nil {
		t.Fatal(err)
	}
	w.writeTop(d.SystemDisk, []write{{off: 96 * MiB, data: secretData}})
	_, sv, err := desktop.SealTops(ctx, w.store, "secret", "test", time.Now())
	if err != nil || sv == nil {
		t.Fatalf("seal the other desktop: %v %v", sv, err)
	}
	if err := w.srv.ensureIndexed(ctx); err != nil {
		t.Fatal(err)
	}
	secretLayer := sv.System

	lap := newLaptop(t, "laptop")
	if _, err := lap.lp.CheckOut(ctx, w.client(w.token), w.desktop, laptop.CheckoutOptions{}); err != nil {
		t.Fatal(err)
	}
	// The laptop writes what only the other desktop holds.
	writeTop(t, lap, w.desktop, proto.DiskSystem, []write{{off: 96 * MiB, data: secretData}})
	prep, err := lap.lp.PrepareCheckin(ctx, w.desktop)
	if err != nil {
		t.Fatal(err)
	}
	cl := w.client(w.token)
	before := w.snap()
	answers := map[string]string{}
	for name, parent := range map[string]string{"foreign": secretLayer, "unknown": strings.Repeat("ab", 32)} {
		req := *prep.Request
		req.Disks = slices.Clone(req.Disks)
		req.Disks[0].Parent = parent
		req.ID = strings.Repeat(map[string]string{"foreign": "f", "unknown": "e"}[name], 32)
		_, err := cl.OpenCheckin(ctx, &req)
		var ae *laptop.APIError
		if !errors.As(err, &ae) {
			t.Fatalf("%s parent: %v", name, err)
		}
		answers[name] = fmt.Sprintf("%d %s", ae.Status, ae.Code)
		if _, err := cl.Missing(ctx, req.ID); !errors.Is(err, proto.ErrNotFound) {
			t.Errorf("%s parent: the check-in was opened (%v)", name, err)
		}
	}
	if answers["foreign"] != answers["unknown"] || !strings.HasPrefix(answers["foreign"], "404") {
		t.Errorf("answers: foreign parent %q, unknown parent %q: want the same 404", answers["foreign"], answers["unknown"])
	}
	if _, err := cl.Layer(ctx, secretLayer); !errors.Is(err, proto.ErrNotFound) {
		t.Errorf("reading the other desktop's layer: %v", err)
	}
	w.unchanged(before, "check-ins on foreign parents")

	// The honest check-in: the other desktop's clusters are not deduplicated.
	if _, err := cl.OpenCheckin(ctx, prep.Request); err != nil {
		t.Fatal(err)
	}
	for dn, l := range prep.Lists {
		if _, err := cl.PutEntries(ctx, prep.Request.ID, dn, l); err != nil {
			t.Fatal(err)
		}
	}
	miss, err := cl.Missing(ctx, prep.Request.ID)
	if err != nil {
		t.Fatal(err)
	}
	if want := len(secretData) / (64 << 10); len(miss) != want {
		t.Errorf("%d clusters asked for, want %d: the server deduplicated against a desktop the device may not read", len(miss), want)
	}
}

// TestOpenCheckinsCappedAndReaped: a device may hold only so many check-ins
// open; one left receiving past the idle limit is reaped while the server
// runs, and its device can open it again.
func TestOpenCheckinsCappedAndReaped(t *testing.T) {
	ctx := context.Background()
	w := newWorld(t, smallSpec())
	clock := time.Now()
	var mu sync.Mutex
	now := func() time.Time { mu.Lock(); defer mu.Unlock(); return clock }
	srv, err := NewServer(w.store, ServerOptions{Logger: testLogger(), Now: now, MaxOpenCheckins: 2,
		SessionMaxIdle: time.Hour, ReapInterval: 50 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	hs := httptest.NewServer(srv.Handler())
	defer hs.Close()
	c, err := laptop.NewClient(hs.URL, w.token, laptop.ClientOptions{})
	if err != nil {
		t.Fatal(err)
	}
	lap := newLaptop(t, "laptop")
	if _, err := lap.lp.CheckOut(ctx, c, w.desktop, laptop.CheckoutOptions{}); err != nil {
		t.Fatal(err)
	}
	writeTop(t, lap, w.desktop, proto.DiskSystem, []write{{off: 64 * MiB, data: testutil.Fill(8, 1*MiB, false)}})
	prep, err := lap.lp.PrepareCheckin(ctx, w.desktop)
	if err != nil {
		t.Fatal(err)
	}
	open := func(id string) error {
		req := *prep.Request
		req.ID = strings.Repeat(id, 32)
		_, err := c.OpenCheckin(ctx, &req)
		return err
	}
	for _, id := range []string{"a", "b"} {
		if err := open(id); err != nil {
			t.Fatal(err)
		}
	}
	if err := open("c"); !errors.Is(err, proto.ErrTooMany) {
		t.Fatalf("a third open check-in: %v, want ErrTooMany", err)
	}
	if err := open("a"); err != nil { // an open one resumes
		t.Fatalf("resuming an open check-in: %v", err)
	}
	// Two hours on, both are abandoned and reaped.
	mu.Lock()
	clock = clock.Add(2 * time.Hour)
	mu.Unlock()
	deadline := time.Now().Add(10 * time.Second)
	for {
		_, err := c.Missing(ctx, strings.Repeat("a", 32))
		if errors.Is(err, proto.ErrNotFound) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the abandoned check-in is still there: %v", err)
		}
		time.Sleep(50 * time.Millisecond)
	}
	if _, err := os.Stat(filepath.Join(w.store.Path(state.SyncDir), state.SessionsDir, strings.Repeat("a", 32))); !os.IsNotExist(err) {
		t.Errorf("the reaped check-in's staging directory: %v", err)
	}
	if err := open("c"); err != nil {
		t.Fatalf("after the reaping: %v", err)
	}
}
