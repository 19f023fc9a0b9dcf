package syncd

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"runtime/pprof"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/cvd-project/cvd/desktop"
	"github.com/cvd-project/cvd/images"
	"github.com/cvd-project/cvd/internal/testutil"
	"github.com/cvd-project/cvd/syncd/laptop"
	"github.com/cvd-project/cvd/syncd/proto"
)

// restartSameAddr stops the server and starts it again on the same address
// (a device's record names it).
func (w *world) restartSameAddr() {
	w.t.Helper()
	addr := w.http.Listener.Addr().String()
	w.stop()
	w.startAt(addr)
}

func (w *world) startAt(addr string) {
	w.t.Helper()
	srv, err := NewServer(w.store, ServerOptions{Now: func() time.Time { return w.now }, Logger: testLogger()})
	if err != nil {
		w.t.Fatal(err)
	}
	var ln net.Listener
	for range 50 {
		if ln, err = net.Listen("tcp", addr); err == nil {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if err != nil {
		w.t.Fatal(err)
	}
	w.srv = srv
	w.http = httptest.NewUnstartedServer(srv.Handler())
	w.http.Listener.Close()
	w.http.Listener = ln
	w.http.Start()
}

// streaming serves a streamed desktop in the background until the test ends
// (or stop is called).
type streaming struct {
	t    *testing.T
	lap  *testLaptop
	name string
	stop func()
}

func serveStream(t *testing.T, lap *testLaptop, name string, cfg laptop.StreamConfig) *streaming {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	ready := make(chan struct{})
	done := make(chan error, 1)
	go func() {
		done <- lap.lp.ServeStream(ctx, name, laptop.ServeOptions{StreamConfig: cfg, Ready: func() { close(ready) }})
	}()
	select {
	case <-ready:
	case err := <-done:
		t.Fatalf("serve stream: %v", err)
	}
	s := &streaming{t: t, lap: lap, name: name}
	var once bool
	s.stop = func() {
		if once {
			return
		}
		once = true
		cancel()
		if err := <-done; err != nil {
			t.Errorf("serve stream: %v", err)
		}
	}
	t.Cleanup(s.stop)
	return s
}

// status waits for the stream's next status write and returns it.
func (s *streaming) status() *laptop.StreamStatus {
	s.t.Helper()
	time.Sleep(1100 * time.Millisecond)
	st, err := s.lap.lp.StreamState(s.name)
	if err != nil {
		s.t.Fatal(err)
	}
	return st
}

// mapExtents is qemu-img map's JSON reduced to data and zero runs.
func mapExtents(t *testing.T, args ...string) string {
	t.Helper()
	out := testutil.Run(t, "qemu-img", append([]string{"map", "--output=json"}, args...)...)
	var exts []struct {
		Start, Length int64
		Data, Zero    bool
	}
	if err := json.Unmarshal([]byte(out), &exts); err != nil {
		t.Fatalf("map: %v\n%s", err, out)
	}
	type run struct {
		start, length int64
		data          bool
	}
	var runs []run
	for _, e := range exts {
		if k := len(runs) - 1; k >= 0 && runs[k].data == e.Data {
			runs[k].length += e.Length
			continue
		}
		runs = append(runs, run{e.Start, e.Length, e.Data})
	}
	var b strings.Builder
	for _, r := range runs {
		b.WriteString(strings.Join([]string{itoa64(r.start), itoa64(r.length), map[bool]string{true: "data", false: "hole"}[r.data]}, " ") + "\n")
	}
	return b.String()
}

func itoa64(n int64) string { b, _ := json.Marshal(n); return string(b) }

func streamWorld(t *testing.T) *world {
	return newWorld(t, worldSpec{
		baseSize: 256 * MiB,
		baseWrites: []write{{off: 0, data: testutil.Fill(1, 24*MiB, false)}, {off: 100 * MiB, data: testutil.Fill(2, 8*MiB, true)},
			{off: 255 * MiB, data: testutil.Fill(3, 1*MiB, false)}},
		appWrites:  []write{{off: 8 * MiB, data: testutil.Fill(4, 4*MiB, false)}, {off: 2 * MiB, zero: 1 * MiB}},
		userSize:   64 * MiB,
		sysWrites:  []write{{off: 20 * MiB, data: testutil.Fill(5, 2*MiB, false)}},
		userWrites: []write{{off: 0, data: testutil.Fill(6, 1*MiB, false)}},
	})
}

// TestStreamCheckout: a streaming check-out returns with nothing fetched but
// the entry lists; QEMU reads the NBD export identical to the server's head
// while it is mostly missing, and maps the same extents; with the server
// down a local cluster reads and a missing one fails within the timeout, and
// reads again once the server is back; pinned, every layer arrives and is
// adopted, and the desktop switches to local files with the guest's writes
// kept, then checks in.
func TestStreamCheckout(t *testing.T) {
	testutil.NeedTool(t, "qemu", "qemu-img", "qemu-io")
	ctx := context.Background()
	w := streamWorld(t)
	lap := newLaptop(t, "laptop")
	c := w.client(w.token)
	rep, err := lap.lp.CheckOutStream(ctx, c, w.desktop, laptop.StreamOptions{})
	if err != nil {
		t.Fatal(err)
	}
	_, hv := w.head()
	t.Logf("stream check-out: %d layers streamed, %d entry-list bytes, %.3f s", len(rep.LayersStream), rep.EntryBytes, rep.Took)
	// Not fit for offline use yet: an online lease, renewed as such.
	if d := rep.Lease.Expires.Sub(w.now); d > time.Hour+time.Second {
		t.Fatalf("a streamed copy's lease lasts %s", d)
	}
	if l, err := lap.lp.Renew(ctx, w.desktop, 0); err != nil || l.Expires.Sub(w.now) > time.Hour+time.Second {
		t.Fatalf("renewal of a streamed copy's lease: %v %v", l, err)
	}
	if len(rep.LayersStream) < 3 || rep.EntryBytes == 0 || rep.Exports[proto.DiskSystem] == "" {
		t.Fatalf("report: %+v", rep)
	}
	s := serveStream(t, lap, w.desktop, laptop.StreamConfig{NoBackground: true, ReadTimeout: 2 * time.Second})
	uri := rep.Exports[proto.DiskSystem]
	st := s.status()
	if st.LocalBytes != 0 || st.TotalBytes < 40*MiB || st.Disks[proto.DiskSystem].NBD != uri {
		t.Fatalf("before any read: %+v", st)
	}

	// A few clusters read, then the server goes away.
	testutil.Run(t, "qemu-io", "-r", "-f", "raw", "-c", "read 0 1M", uri)
	w.stop()
	start := time.Now()
	testutil.Run(t, "qemu-io", "-r", "-f", "raw", "-c", "read 0 1M", uri)
	out, err := testutil.RunErr("qemu-io", "-r", "-f", "raw", "-c", "read 100M 64k", uri)
	took := time.Since(start)
	if !strings.Contains(out, "Input/output error") {
		t.Fatalf("a missing cluster with the server down: %v %s", err, out)
	}
	if took > 10*time.Second {
		t.Fatalf("the failed read took %s", took)
	}
	t.Logf("server down: local read fine, missing read failed after %s", took)
	w.startAt(strings.TrimPrefix(c.URL(), "http://"))
	testutil.Run(t, "qemu-io", "-r", "-f", "raw", "-c", "read -P 0 2M 1M", "-c", "read 100M 64k", uri)

	// The whole export against the server's head, while most of it is missing.
	st = s.status()
	if st.LocalBytes*4 > st.TotalBytes {
		t.Fatalf("before the compare %d of %d bytes are local already", st.LocalBytes, st.TotalBytes)
	}
	headSys := w.store.LayerPath(hv.System)
	if out := testutil.Run(t, "qemu-img", "compare", "-f", "raw", "-F", "qcow2", uri, headSys); !strings.Contains(out, "identical") {
		t.Fatalf("compare: %s", out)
	}
	if a, b := mapExtents(t, "-f", "raw", uri), mapExtents(t, "-f", "qcow2", headSys); a != b {
		t.Fatalf("qemu-img map of the export:\n%s\nof the server's chain:\n%s", a, b)
	}
	testutil.Run(t, "qemu-img", "compare", "-f", "raw", "-F", "qcow2", rep.Exports[proto.DiskUser], w.store.LayerPath(hv.User))
	st = s.status()
	t.Logf("after the compares: %+v", st.StreamStats)
	if st.Waits == 0 || st.FetchedOnUse == 0 {
		t.Fatalf("nothing was fetched on demand: %+v", st.StreamStats)
	}

	// The guest writes on its top (over the export); then everything is
	// fetched, the layers are adopted, and the desktop switches.
	sysTop := st.Disks[proto.DiskSystem].Top
	testutil.Run(t, "qemu-io", "-f", "qcow2", "-c", "write -P 0x5c 1M 64k", sysTop)
	if _, err := lap.lp.CheckIn(ctx, w.desktop, laptop.CheckinOptions{}); !errors.Is(err, laptop.ErrStreaming) {
		t.Fatalf("check-in while streaming: %v", err)
	}
	if _, err := lap.lp.Pin(w.desktop); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(2 * time.Minute)
	for !st.Complete {
		if time.Now().After(deadline) {
			t.Fatalf("pinned stream did not complete: %+v", st)
		}
		st = s.status()
	}
	// Adopted, and kept by gc although no desktop of the store stands on them yet.
	if _, err := lap.store.GC(ctx, false); err != nil {
		t.Fatal(err)
	}
	for _, id := range rep.LayersStream {
		if _, err := lap.store.Layer(id); err != nil {
			t.Fatalf("streamed layer %s after gc: %v", id[:12], err)
		}
	}
	if err := lap.lp.SwitchStream(ctx, w.desktop); err == nil {
		t.Fatal("switched while the stream still serves")
	}
	s.stop()
	if err := lap.lp.SwitchStream(ctx, w.desktop); err != nil {
		t.Fatal(err)
	}
	top := lap.top(w.desktop, proto.DiskSystem)
	testutil.Run(t, "qemu-io", "-r", "-f", "qcow2", "-c", "read -P 0x5c 1M 64k", top)
	// Whole and local: the switch renewed the lease as an offline one.
	if co, err := lap.lp.Checkout(w.desktop); err != nil || co.Lease.Expires.Sub(w.now) < 24*time.Hour {
		t.Fatalf("the lease after the switch: %+v %v", co, err)
	}
	if _, err := os.Stat(lap.lp.StreamDir(w.desktop)); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("stream directory left: %v", err)
	}
	crep, err := lap.lp.CheckIn(ctx, w.desktop, laptop.CheckinOptions{})
	if err != nil {
		t.Fatal(err)
	}
	_, hv = w.head()
	qemuCompare(t, w.store.LayerPath(hv.System), top)
	if crep.ChangedBytes != 64*KiB {
		t.Fatalf("check-in after the switch moved %d changed bytes, want one cluster", crep.ChangedBytes)
	}
}

// TestStreamCacheAndWorkingSet: with a cache budget the partial files stay
// within it while the whole disk is read twice, every partial layer checks
// clean; the clusters read first are the layers' working set on the server,
// and a second store's stream fetches them before anything is read.
func TestStreamCacheAndWorkingSet(t *testing.T) {
	testutil.NeedTool(t, "qemu", "qemu-img", "qemu-io")
	ctx := context.Background()
	w := streamWorld(t)
	lap := newLaptop(t, "laptop")
	const budget = 8 * MiB
	rep, err := lap.lp.CheckOutStream(ctx, w.client(w.token), w.desktop, laptop.StreamOptions{CacheSize: budget})
	if err != nil {
		t.Fatal(err)
	}
	_, hv := w.head()
	s := serveStream(t, lap, w.desktop, laptop.StreamConfig{WorkingWindow: 2 * time.Second})
	uri := rep.Exports[proto.DiskSystem]
	// The "boot": the first 2 MiB (the base's) and a cluster of the app's,
	// within the working window; what follows is later.
	testutil.Run(t, "qemu-io", "-r", "-f", "raw", "-c", "read 0 2M", "-c", "read 8M 64k", uri)
	time.Sleep(2 * time.Second)
	for range 2 {
		if out, err := testutil.RunErr("qemu-img", "compare", "-f", "raw", "-F", "qcow2", uri, w.store.LayerPath(hv.System)); err != nil {
			if os.Getenv("CVD_TEST_DUMP") != "" {
				pprof.Lookup("goroutine").WriteTo(os.Stderr, 1)
			}
			t.Fatalf("compare through the cache: %v\n%s\nstream: %+v", err, out, s.status().StreamStats)
		}
	}
	st := s.status()
	t.Logf("cache: %+v", st.StreamStats)
	if st.Evicted == 0 || st.LocalBytes > budget {
		t.Fatalf("cache: %+v", st.StreamStats)
	}
	parts, _ := filepath.Glob(filepath.Join(lap.lp.StreamDir(w.desktop), "layers", "*.qcow2"))
	if len(parts) == 0 {
		t.Fatal("no partial layer")
	}
	var total int64
	for _, p := range parts {
		fi, err := os.Stat(p)
		if err != nil {
			t.Fatal(err)
		}
		// What the files hold on the host (evicted clusters are punched out).
		total += fi.Sys().(*syscall.Stat_t).Blocks * 512
		testutil.QemuCheck(t, p)
	}
	t.Logf("partial files: %d bytes on disk for a budget of %d", total, budget)
	if total > budget+2*MiB {
		t.Fatalf("partial files hold %d bytes, budget %d", total, budget)
	}
	s.stop() // reports the working set

	ws, err := w.srv.WorkingSet(w.base)
	if err != nil {
		t.Fatal(err)
	}
	if len(ws.Clusters) != 32 || ws.Clusters[0] != 0 || ws.Clusters[31] != 31 {
		t.Fatalf("working set of the base: %v", ws.Clusters)
	}
	if ws, err := w.srv.WorkingSet(w.app); err != nil || len(ws.Clusters) != 1 || ws.Clusters[0] != 128 {
		t.Fatalf("working set of the app layer: %v %v", ws, err)
	}

	// Another store: its stream fetches the working set before any read.
	if err := lap.lp.Release(ctx, w.desktop, true); err != nil {
		t.Fatal(err)
	}
	lap2 := newLaptop(t, "laptop2")
	_, tok2, err := w.srv.AddDevice("laptop2", DeviceOptions{Desktops: []string{w.desktop}})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := lap2.lp.CheckOutStream(ctx, w.client(tok2), w.desktop, laptop.StreamOptions{}); err != nil {
		t.Fatal(err)
	}
	s2 := serveStream(t, lap2, w.desktop, laptop.StreamConfig{NoBackground: true})
	st2 := s2.status()
	if st2.Fetched != 33*64*KiB || st2.FetchedOnUse != 0 {
		t.Fatalf("second stream before any read: %+v", st2.StreamStats)
	}
	t.Logf("second stream fetched %d bytes of working set before any read", st2.Fetched)
	s2.stop()
	if err := lap2.lp.Release(ctx, w.desktop, true); err != nil {
		t.Fatal(err)
	}
}

// TestStreamEndpointsRefuse: the streaming endpoints refuse malformed reads and
// working sets with 400, and another desktop's layer with the same 404 as an
// unknown one; a tampered entry list fails the streaming check-out.
func TestStreamEndpointsRefuse(t *testing.T) {
	ctx := context.Background()
	w := streamWorld(t)
	if _, err := desktop.Create(ctx, w.store, "secret", images.DesktopSpec{Base: w.base}); err != nil {
		t.Fatal(err)
	}
	d, _ := w.store.Desktop("secret")
	w.writeTop(d.SystemDisk, []write{{off: 96 * MiB, data: testutil.Fill(77, 1*MiB, false)}})
	_, sv, err := desktop.SealTops(ctx, w.store, "secret", "test", time.Now())
	if err != nil || sv == nil {
		t.Fatalf("seal the other desktop: %v", err)
	}
	do := func(method, path string, body []byte) (int, string) {
		req, _ := http.NewRequest(method, w.http.URL+path, bytes.NewReader(body))
		req.Header.Set("Authorization", "Bearer "+w.token)
		req.Header.Set("Content-Type", "application/json")
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
		return resp.StatusCode, string(b)
	}
	idx := func(is ...int64) []byte {
		var b []byte
		for _, i := range is {
			b = binary.BigEndian.AppendUint64(b, uint64(i))
		}
		return b
	}
	base := "/v1/layers/" + w.base
	cases := []struct {
		name, method, path string
		body               []byte
		want               int
	}{
		{"read: no index", "POST", base + "/read", nil, 400},
		{"read: not 8-byte indexes", "POST", base + "/read", []byte{1, 2, 3}, 400},
		{"read: out of order", "POST", base + "/read", idx(5, 3), 400},
		{"read: repeated", "POST", base + "/read", idx(5, 5), 400},
		{"read: beyond the layer", "POST", base + "/read", idx(1 << 40), 400},
		{"read: negative", "POST", base + "/read", idx(-1), 400},
		{"read: too many", "POST", base + "/read", idx(func() []int64 {
			var a []int64
			for i := range int64(proto.MaxRead + 1) {
				a = append(a, i)
			}
			return a
		}()...), 400},
		{"read: another desktop's layer", "POST", "/v1/layers/" + sv.System + "/read", idx(0), 404},
		{"read: unknown layer", "POST", "/v1/layers/" + strings.Repeat("ab", 32) + "/read", idx(0), 404},
		{"entries: another desktop's layer", "GET", "/v1/layers/" + sv.System + "/entries", nil, 404},
		{"working set: beyond the layer", "PUT", base + "/workingset", []byte(`{"clusters":[99999999]}`), 400},
		{"working set: not JSON", "PUT", base + "/workingset", []byte(`{"clusters":`), 400},
		{"working set: another desktop's layer", "PUT", "/v1/layers/" + sv.System + "/workingset", []byte(`{"clusters":[0]}`), 404},
	}
	for _, c := range cases {
		if code, body := do(c.method, c.path, c.body); code != c.want {
			t.Errorf("%s: HTTP %d %s, want %d", c.name, code, body, c.want)
		}
	}
	if ws, _ := w.srv.WorkingSet(w.base); len(ws.Clusters) != 0 {
		t.Errorf("a refused report changed the working set: %v", ws.Clusters)
	}

	// A tampered entry list (the server's cached copy) fails the check-out.
	lap := newLaptop(t, "laptop")
	if _, err := lap.lp.CheckOutStream(ctx, w.client(w.token), w.desktop, laptop.StreamOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := lap.lp.Release(ctx, w.desktop, true); err != nil {
		t.Fatal(err)
	}
	list := filepath.Join(w.dir, "sync", "entries", w.base)
	b, err := os.ReadFile(list)
	if err != nil {
		t.Fatal(err)
	}
	b[len(b)-1] ^= 1
	os.WriteFile(list, b, 0o644)
	lap2 := newLaptop(t, "laptop2")
	if _, err := lap2.lp.CheckOutStream(ctx, w.client(w.token), w.desktop, laptop.StreamOptions{}); !errors.Is(err, proto.ErrDigestMismatch) {
		t.Fatalf("check-out with a tampered entry list: %v", err)
	}
}
