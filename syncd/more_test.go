package syncd

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"log"
	"math/big"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/ulikunitz/xz"

	"github.com/cvd-project/cvd/syncd/laptop"

	"github.com/cvd-project/cvd/syncd/state"

	"github.com/cvd-project/cvd/catalog"
	"github.com/cvd-project/cvd/disk"
	"github.com/cvd-project/cvd/images"
	"github.com/cvd-project/cvd/internal/testutil"
	"github.com/cvd-project/cvd/syncd/proto"
)

// The layer-ID recipe syncd re-implements must agree with images.ComputeID, on
// layers written by QEMU (data, zero clusters, a partial last cluster) and by cvd.
func TestLayerIDMatchesImages(t *testing.T) {
	testutil.NeedQemu(t)
	ctx := context.Background()
	dir := t.TempDir()
	base := filepath.Join(dir, "base.qcow2")
	top := filepath.Join(dir, "top.qcow2")
	testutil.Run(t, "qemu-img", "create", "-q", "-f", "qcow2", base, "100000000") // not a multiple of the cluster size
	testutil.Run(t, "qemu-io", "-c", "write -P 0x11 0 1M", "-c", "write -P 0x22 99990000 10000", "-c", "write -z 4M 1M", base)
	testutil.Run(t, "qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", "-b", base, "-F", "qcow2", top)
	testutil.Run(t, "qemu-io", "-c", "write -P 0x33 8192 100000", "-c", "write -z 0 4096", "-c", "write -P 0 65536 4096", "-c", "write -P 0x44 99999000 1000", top)
	for _, c := range []struct {
		path, parent string
	}{{base, ""}, {top, "parentid"}} {
		img, err := disk.Open(c.path, disk.OpenOptions{ReadOnly: true, NoBacking: true})
		if err != nil {
			t.Fatal(err)
		}
		want, _, err := images.ComputeID(ctx, img, c.parent)
		if err != nil {
			t.Fatal(err)
		}
		cs := images.DigestClusterSize(img.Info())
		h := proto.NewIDHasher(c.parent, img.Size(), cs)
		err = images.WalkLayerFrom(ctx, img, cs, c.parent != "", 0, func(idx int64, data []byte) error {
			e := proto.Entry{Index: idx, Zero: data == nil}
			if data != nil {
				e.Digest = sha256Digest(data)
			}
			h.Add(e)
			return nil
		})
		img.Close()
		if err != nil {
			t.Fatal(err)
		}
		if h.Sum() != want {
			t.Errorf("%s: syncd computes %s, images %s", filepath.Base(c.path), state.Short(h.Sum()), state.Short(want))
		}
		// A saved and restored hash state continues the same hash.
		st, _ := h.State()
		h2 := proto.NewIDHasher("other", 1, 512)
		if err := h2.Restore(st); err != nil || h2.Sum() != want {
			t.Errorf("restored hash: %v", err)
		}
	}
}

func TestConflictAndRollback(t *testing.T) {
	ctx := context.Background()
	w := newWorld(t, smallSpec())
	a := newLaptop(t, "a")
	if _, err := a.lp.CheckOut(ctx, w.client(w.token), w.desktop, laptop.CheckoutOptions{}); err != nil {
		t.Fatal(err)
	}
	writeTop(t, a, w.desktop, proto.DiskSystem, []write{{off: 64 * MiB, data: testutil.Fill(20, 2*MiB, false)}})
	// The administrator breaks a's lease; b checks out and in.
	if _, err := w.srv.BreakLease(w.desktop); err != nil {
		t.Fatal(err)
	}
	_, tokB, _ := w.srv.AddDevice("b", DeviceOptions{Desktops: []string{w.desktop}})
	b := newLaptop(t, "b")
	if _, err := b.lp.CheckOut(ctx, w.client(tokB), w.desktop, laptop.CheckoutOptions{}); err != nil {
		t.Fatal(err)
	}
	writeTop(t, b, w.desktop, proto.DiskSystem, []write{{off: 80 * MiB, data: testutil.Fill(21, 1*MiB, false)}})
	rb, err := b.lp.CheckIn(ctx, w.desktop, laptop.CheckinOptions{})
	if err != nil {
		t.Fatal(err)
	}
	headB, _ := w.head()
	if headB != rb.Version || rb.Conflict {
		t.Fatalf("b's check-in: %+v", rb)
	}
	// a's check-in is kept as a conflict version beside the head.
	ra, err := a.lp.CheckIn(ctx, w.desktop, laptop.CheckinOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if !ra.Conflict || ra.Head != headB || ra.Version != headB+1 {
		t.Fatalf("a's check-in: %+v, want a conflict version beside head %d", ra, headB)
	}
	if n, _ := w.head(); n != headB {
		t.Fatalf("a conflict moved the head to %d", n)
	}
	st, _ := w.srv.Versions(w.desktop)
	cv := st.Versions[len(st.Versions)-1]
	if !cv.Conflict || cv.Device != "laptop1" || !strings.HasPrefix(cv.Note, "conflict ") {
		t.Errorf("conflict version: %+v", cv)
	}
	qemuCompare(t, w.store.LayerPath(cv.System), a.top(w.desktop, proto.DiskSystem))
	// Rolling back to the conflict version makes its layers the head.
	rv, err := w.srv.Rollback(ctx, w.desktop, cv.N)
	if err != nil {
		t.Fatal(err)
	}
	n, hv := w.head()
	if n != rv.N || hv.System != cv.System || !strings.HasPrefix(hv.Note, "rollback") {
		t.Fatalf("after rollback: head %d %+v", n, hv)
	}
	d, _ := w.store.Desktop(w.desktop)
	qemuCompare(t, w.store.Path(d.SystemDisk), a.top(w.desktop, proto.DiskSystem))
	if _, err := w.srv.Rollback(ctx, w.desktop, 99); !errors.Is(err, proto.ErrNotFound) {
		t.Errorf("rollback to a missing version: %v", err)
	}
}

func TestServerChangesDuringCheckoutMakeAConflict(t *testing.T) {
	ctx := context.Background()
	w := newWorld(t, smallSpec())
	a := newLaptop(t, "a")
	if _, err := a.lp.CheckOut(ctx, w.client(w.token), w.desktop, laptop.CheckoutOptions{}); err != nil {
		t.Fatal(err)
	}
	d, _ := w.store.Desktop(w.desktop)
	w.writeTop(d.SystemDisk, []write{{off: 100 * MiB, data: testutil.Fill(30, 1*MiB, false)}}) // someone used the server copy
	writeTop(t, a, w.desktop, proto.DiskSystem, []write{{off: 64 * MiB, data: testutil.Fill(31, 1*MiB, false)}})
	rep, err := a.lp.CheckIn(ctx, w.desktop, laptop.CheckinOptions{})
	if err != nil {
		t.Fatal(err)
	}
	n, hv := w.head()
	if !rep.Conflict || n != rep.Head || hv.Note != "server changes during check-out" {
		t.Fatalf("check-in %+v; head %d %+v", rep, n, hv)
	}
}

func TestExportImportBundle(t *testing.T) {
	ctx := context.Background()
	spec := smallSpec()
	spec.baseWrites = []write{{off: 0, data: testutil.Fill(1, 1*MiB, false)}, {off: 8 * MiB, data: testutil.Fill(2, 4*MiB, true)}}
	spec.appWrites = []write{{off: 32 * MiB, data: testutil.Fill(3, 256*KiB, false)}}
	spec.sysWrites = []write{{off: 70 * MiB, data: testutil.Fill(40, 1*MiB, true)}}
	w := newWorld(t, spec)
	bundle := filepath.Join(t.TempDir(), "desk.cvdb")
	rep, err := w.srv.Export(ctx, w.desktop, bundle, ExportOptions{TTL: time.Hour, Device: "laptop1"})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("bundle: %d layers, %d bytes (%d before xz)", rep.Layers, rep.Bytes, rep.Stream)
	if rep.Header.Lease == nil {
		t.Error("export with --device took no lease")
	}
	lap := newLaptop(t, "offline")
	ir, err := lap.lp.ImportBundle(ctx, bundle)
	if err != nil {
		t.Fatal(err)
	}
	_, hv := w.head()
	if ir.Version != rep.Header.Version || len(ir.LayersWritten) != 3 {
		t.Fatalf("import: %+v", ir)
	}
	for _, id := range []string{hv.System, w.base, w.app} {
		if _, err := lap.store.Layer(id); err != nil {
			t.Errorf("layer %s not kept under its ID: %v", state.Short(id), err)
		}
	}
	qemuCompare(t, w.store.LayerPath(hv.System), lap.top(w.desktop, proto.DiskSystem))
	co, err := lap.lp.Checkout(w.desktop)
	if err != nil || !co.Offline || !co.Lease.Expires.Equal(rep.Header.Expires) {
		t.Fatalf("record: %+v %v", co, err)
	}
	// A second import of the same bundle writes nothing new.
	ir2, err := lap.lp.ImportBundle(ctx, bundle)
	if err != nil || len(ir2.LayersWritten) != 0 {
		t.Fatalf("re-import: %+v %v", ir2, err)
	}
	// A damaged bundle is refused and leaves the store as it was.
	b, _ := os.ReadFile(bundle)
	b[len(b)/2] ^= 0xff
	bad := filepath.Join(t.TempDir(), "bad.cvdb")
	os.WriteFile(bad, b, 0o600)
	lap2 := newLaptop(t, "offline2")
	if _, err := lap2.lp.ImportBundle(ctx, bad); err == nil {
		t.Fatal("a damaged bundle was imported")
	}
	if ls, _ := lap2.store.Layers(); len(ls) != 0 {
		t.Errorf("a damaged bundle left %d layers", len(ls))
	}
	// An expired bundle is refused.
	lap2.reopen(laptop.LaptopOptions{Now: func() time.Time { return time.Now().Add(2 * time.Hour) }})
	if _, err := lap2.lp.ImportBundle(ctx, bundle); !errors.Is(err, proto.ErrExpired) {
		t.Errorf("expired bundle: %v", err)
	}
}

func TestMetricsAndTLS(t *testing.T) {
	ctx := context.Background()
	w := newWorld(t, smallSpec())
	// TLS with a self-signed certificate the client is told to trust.
	certPEM, keyPEM := selfSigned(t)
	dir := t.TempDir()
	ca := filepath.Join(dir, "ca.pem")
	os.WriteFile(ca, certPEM, 0o600)
	ts := httptest.NewUnstartedServer(w.srv.Handler())
	ts.Config.ErrorLog = log.New(io.Discard, "", 0)
	cert, err := tlsKeyPair(certPEM, keyPEM)
	if err != nil {
		t.Fatal(err)
	}
	ts.TLS = cert
	ts.StartTLS()
	defer ts.Close()
	c, err := laptop.NewClient(ts.URL, w.token, laptop.ClientOptions{CACert: ca})
	if err != nil {
		t.Fatal(err)
	}
	lap := newLaptop(t, "laptop")
	if _, err := lap.lp.CheckOut(ctx, c, w.desktop, laptop.CheckoutOptions{CACert: ca}); err != nil {
		t.Fatal(err)
	}
	// 1 MiB new, and 1 MiB the base holds (its first MiB, elsewhere): half of
	// the check-in's 32 data clusters come from the store.
	writeTop(t, lap, w.desktop, proto.DiskSystem, []write{{off: 64 * MiB, data: testutil.Fill(50, 1*MiB, false)},
		{off: 96 * MiB, data: testutil.Fill(1, 1*MiB, false)}})
	if _, err := lap.lp.CheckIn(ctx, w.desktop, laptop.CheckinOptions{}); err != nil {
		t.Fatal(err)
	}
	// Without the CA the client refuses the server.
	bare, _ := laptop.NewClient(ts.URL, w.token, laptop.ClientOptions{})
	if _, err := bare.Desktop(ctx, w.desktop); err == nil || !strings.Contains(err.Error(), "certificate") {
		t.Errorf("untrusted certificate: %v", err)
	}
	// Plain HTTP to the TLS server: the error says to use https.
	plain, _ := laptop.NewClient(strings.Replace(ts.URL, "https://", "http://", 1), w.token, laptop.ClientOptions{})
	if _, err := plain.Desktop(ctx, w.desktop); err == nil || !strings.Contains(err.Error(), "speaks HTTPS: use https://") {
		t.Errorf("http:// to a TLS server: %v", err)
	}
	w.client("cvd1_0000000000000000_"+strings.Repeat("x", 43)).Desktop(ctx, w.desktop)
	resp, err := http.Get(w.http.URL + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	m := string(b)
	for _, want := range []string{
		"# TYPE cvd_sync_sent_bytes_total counter",
		`cvd_sync_checkins_total{result="check-in"} 1`,
		"cvd_sync_checkouts_total 1",
		"cvd_sync_auth_failures_total 1",
		"cvd_sync_active_leases 1",
		`cvd_sync_requests_total{code="200",route="commit"} 1`,
		`cvd_sync_request_duration_seconds_bucket{route="checkout",le="+Inf"} 1`,
		"# TYPE process_resident_memory_bytes gauge",
		"cvd_sync_committed_clusters_total 32",
		"cvd_sync_deduplicated_clusters_total 16",
		"cvd_sync_dedup_ratio 0.5",
	} {
		if !strings.Contains(m, want) {
			t.Errorf("metrics lack %q", want)
		}
	}
	if strings.Contains(m, "cvd_sync_received_bytes_total 0\n") {
		t.Error("no bytes received counted")
	}
}

func TestAgentRenewsAndChecksIn(t *testing.T) {
	ctx := context.Background()
	w := newWorld(t, smallSpec())
	lap := newLaptop(t, "laptop")
	rep, err := lap.lp.CheckOut(ctx, w.client(w.token), w.desktop, laptop.CheckoutOptions{TTL: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	writeTop(t, lap, w.desktop, proto.DiskSystem, []write{{off: 64 * MiB, data: testutil.Fill(60, 1*MiB, false)}})
	lap.close()
	w.now = w.now.Add(10 * time.Minute)
	evs, err := laptop.AgentCycle(ctx, lap.dir, laptop.AgentOptions{CheckinEvery: time.Nanosecond})
	if err != nil {
		t.Fatal(err)
	}
	var renewed, checkedIn bool
	for _, e := range evs {
		renewed = renewed || e.Action == "renewed"
		checkedIn = checkedIn || (e.Action == "checked-in" && !strings.Contains(e.Detail, "no changes"))
	}
	if !renewed || !checkedIn {
		t.Fatalf("agent events %+v", evs)
	}
	st, _ := w.srv.DesktopStatus(w.desktop)
	if !st.Lease.Expires.After(rep.Lease.Expires) {
		t.Errorf("lease not extended: %v, was %v", st.Lease.Expires, rep.Lease.Expires)
	}
	if n, _ := w.head(); n != rep.Version+1 {
		t.Errorf("head %d after the agent's check-in", n)
	}
	// Offline: the server is gone; the agent reports it and keeps the copy.
	w.stop()
	evs, err = laptop.AgentCycle(ctx, lap.dir, laptop.AgentOptions{})
	if err != nil || len(evs) != 1 || evs[0].Action != "failed" {
		t.Fatalf("offline agent: %+v %v", evs, err)
	}
}

func sha256Digest(b []byte) proto.Digest {
	var d proto.Digest
	ec, _ := proto.EncodeCluster(0, 0, b, nil, proto.EncodeOptions{})
	d = ec.Digest
	return d
}

func selfSigned(t *testing.T) (certPEM, keyPEM []byte) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "cvd test"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IPAddresses: []net.IP{net.ParseIP("127.0.0.1")}, DNSNames: []string{"localhost"},
		KeyUsage: x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign, IsCA: true, BasicConstraintsValid: true,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	kb, _ := x509.MarshalECPrivateKey(key)
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kb})
}

func tlsKeyPair(certPEM, keyPEM []byte) (*tls.Config, error) {
	c, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		return nil, err
	}
	return &tls.Config{Certificates: []tls.Certificate{c}}, nil
}

// repeatSpec is smallSpec with an app that repeats 2 MiB (32 clusters) of the
// base: a laptop holding the base gets them as references.
func repeatSpec() worldSpec {
	spec := smallSpec()
	base := testutil.Fill(1, 4*MiB, false)
	spec.baseWrites = []write{{off: 0, data: base}}
	spec.appWrites = []write{{off: 32 * MiB, data: base[:2*MiB]}}
	return spec
}

// A check-out that says the laptop holds a layer whose clusters it then cannot
// read (they do not match their digests) gets the data instead: the stream is
// asked for again without references.
func TestReferenceFallback(t *testing.T) {
	ctx := context.Background()
	spec := repeatSpec()
	w := newWorld(t, spec)
	if err := w.srv.ensureIndexed(ctx); err != nil { // references come from the index
		t.Fatal(err)
	}
	c := w.client(w.token)
	src := t.TempDir()
	makeImage(t, filepath.Join(src, "base.qcow2"), spec.baseSize, "", spec.baseWrites)
	// The laptop holds the base, but its clusters no longer match their digests.
	lap := newLaptop(t, "laptop")
	if _, _, err := lap.store.Import(ctx, filepath.Join(src, "base.qcow2"), images.ImportOptions{}); err != nil {
		t.Fatal(err)
	}
	testutil.Run(t, "qemu-io", "-c", "write -P 0x77 0 4M", lap.store.LayerPath(w.base))
	rep, err := lap.lp.CheckOut(ctx, c, w.desktop, laptop.CheckoutOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if rep.ClustersByRef != 0 || !slices.Contains(rep.LayersFetched, w.app) {
		t.Errorf("%d clusters by reference, layers fetched %v: want the app's data after the fallback", rep.ClustersByRef, rep.LayersFetched)
	}
	if l, err := lap.store.Layer(w.app); err != nil || l.ID != w.app {
		t.Errorf("the app layer on the laptop: %v", err)
	}
	// With the base really held, the same clusters come as references.
	lap2 := newLaptop(t, "laptop2")
	if _, _, err := lap2.store.Import(ctx, filepath.Join(src, "base.qcow2"), images.ImportOptions{}); err != nil {
		t.Fatal(err)
	}
	rep, err = lap2.lp.CheckOut(ctx, c, w.desktop, laptop.CheckoutOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if rep.ClustersByRef != 32 {
		t.Errorf("%d clusters by reference, want 32", rep.ClustersByRef)
	}
	qemuCompare(t, w.store.LayerPath(w.app), lap2.top(w.desktop, proto.DiskSystem))
}

// A commit cut after the catalog took the version (before syncd recorded the
// check-in as committed) completes when asked again, without a second version.
func TestCommitCutAfterCatalog(t *testing.T) {
	ctx := context.Background()
	w := newWorld(t, smallSpec())
	lap := newLaptop(t, "laptop")
	if _, err := lap.lp.CheckOut(ctx, w.client(w.token), w.desktop, laptop.CheckoutOptions{}); err != nil {
		t.Fatal(err)
	}
	writeTop(t, lap, w.desktop, proto.DiskSystem, []write{{off: 64 * MiB, data: testutil.Fill(70, 1*MiB, false)}})
	before, _ := w.head()
	w.srv.failpoint = func(step string) error { return errors.New("cut at " + step) }
	if _, err := lap.lp.CheckIn(ctx, w.desktop, laptop.CheckinOptions{}); err == nil || !strings.Contains(err.Error(), "cut at commit:catalog") {
		t.Fatalf("cut commit: %v", err)
	}
	w.srv.failpoint = nil
	rep, err := lap.lp.CheckIn(ctx, w.desktop, laptop.CheckinOptions{})
	if err != nil {
		t.Fatal(err)
	}
	st, _ := w.srv.Versions(w.desktop)
	if rep.Version != before+1 || st.Head != before+1 || len(st.Versions) != before+1 {
		t.Fatalf("after the rerun: report version %d, head %d, %d versions (before: head %d)", rep.Version, st.Head, len(st.Versions), before)
	}
	_, hv := w.head()
	qemuCompare(t, w.store.LayerPath(hv.System), lap.top(w.desktop, proto.DiskSystem))
	// The laptop's catalog mirrors the server's numbers.
	d, _ := lap.store.Desktop(w.desktop)
	if d.Head != rep.Version || d.HeadVersion().System != hv.System {
		t.Errorf("laptop head %d %+v", d.Head, d.HeadVersion())
	}
}

// Versions an earlier syncd kept in its own state move into the catalog.
func TestMigrateVersionsIntoCatalog(t *testing.T) {
	w := newWorld(t, smallSpec())
	w.stop()
	st, err := state.Open(w.store)
	if err != nil {
		t.Fatal(err)
	}
	legacy := map[string]any{"name": w.desktop, "head": 2, "versions": []proto.Version{
		{N: 1, System: w.app, Note: "create"},
		{N: 2, System: w.app, Note: "check-in 0123456789ab", Device: "old-laptop"},
	}}
	st.Update(func(tx *catalog.Tx) error { return state.PutJSON(tx, state.BucketVersions, w.desktop, legacy) })
	st.Close()
	w.start()
	vs, err := w.srv.Versions(w.desktop)
	if err != nil {
		t.Fatal(err)
	}
	if vs.Head != 2 || len(vs.Versions) != 2 || vs.Versions[1].Device != "old-laptop" {
		t.Fatalf("after migration: %+v", vs)
	}
	// Versions recorded before kinds existed get theirs from the note.
	if vs.Versions[0].Kind != images.VersionCreate || vs.Versions[1].Kind != images.VersionCheckin {
		t.Errorf("kinds of legacy versions: %q, %q", vs.Versions[0].Kind, vs.Versions[1].Kind)
	}
	w.srv.st.View(func(tx *catalog.Tx) error {
		if tx.Bucket(state.BucketVersions).Get([]byte(w.desktop)) != nil {
			t.Error("the legacy entry is still there")
		}
		return nil
	})
}

// A fetch's saved hash state carries its entry counts.
func TestHashStateKeepsCounts(t *testing.T) {
	h := proto.NewIDHasher("", 1<<20, 65536)
	h.Add(proto.Entry{Index: 1, Digest: proto.Digest{1}})
	h.Add(proto.Entry{Index: 2, Zero: true})
	st, err := h.State()
	if err != nil {
		t.Fatal(err)
	}
	h2 := proto.NewIDHasher("", 1<<20, 65536)
	if err := h2.Restore(st); err != nil {
		t.Fatal(err)
	}
	h.Add(proto.Entry{Index: 3, Digest: proto.Digest{3}})
	h2.Add(proto.Entry{Index: 3, Digest: proto.Digest{3}})
	if h2.Count != 3 || h2.Data != 2 || h2.Sum() != h.Sum() {
		t.Fatalf("restored: %d entries, %d data, %s vs %s", h2.Count, h2.Data, h2.Sum(), h.Sum())
	}
}

// The catalog shows a desktop's active lease and bound devices (overlay takes a
// leased desktop as in use).
func TestCatalogShowsLease(t *testing.T) {
	ctx := context.Background()
	w := newWorld(t, smallSpec())
	d, _ := w.store.Desktop(w.desktop)
	if d.Lease != "" || !slices.Equal(d.Devices, []string{"laptop1"}) {
		t.Fatalf("before: lease %q, devices %v", d.Lease, d.Devices)
	}
	lap := newLaptop(t, "laptop")
	if _, err := lap.lp.CheckOut(ctx, w.client(w.token), w.desktop, laptop.CheckoutOptions{}); err != nil {
		t.Fatal(err)
	}
	d, _ = w.store.Desktop(w.desktop)
	if !strings.HasPrefix(d.Lease, "laptop1 until ") {
		t.Fatalf("checked out: lease %q", d.Lease)
	}
	if err := lap.lp.Release(ctx, w.desktop, false); err != nil {
		t.Fatal(err)
	}
	d, _ = w.store.Desktop(w.desktop)
	if d.Lease != "" {
		t.Fatalf("released: lease %q", d.Lease)
	}
	if _, err := lap.store.Desktop(w.desktop); !errors.Is(err, images.ErrNotFound) {
		t.Errorf("the released copy is still on the laptop: %v", err)
	}
}

// TestLeaseEpochs: every lease of a desktop has the next epoch; the catalog
// holds at most one active lease per desktop; an expired lease shows in the
// desktop's record as no lease at once, with nothing to refresh it.
func TestLeaseEpochs(t *testing.T) {
	ctx := context.Background()
	w := newWorld(t, smallSpec())
	lap := newLaptop(t, "laptop")
	var epochs []int64
	for range 2 {
		rep, err := lap.lp.CheckOut(ctx, w.client(w.token), w.desktop, laptop.CheckoutOptions{})
		if err != nil {
			t.Fatal(err)
		}
		epochs = append(epochs, rep.Lease.Epoch)
		if err := lap.lp.Release(ctx, w.desktop, false); err != nil {
			t.Fatal(err)
		}
	}
	w.now = time.Now().AddDate(-1, 0, 0) // the server grants a lease that has already expired
	rep, err := lap.lp.CheckOut(ctx, w.client(w.token), w.desktop, laptop.CheckoutOptions{})
	if err != nil {
		t.Fatal(err)
	}
	epochs = append(epochs, rep.Lease.Epoch)
	if !slices.Equal(epochs, []int64{1, 2, 3}) {
		t.Errorf("epochs of three leases in turn: %v", epochs)
	}
	ls, err := w.srv.Leases()
	if err != nil || len(ls) != 1 || ls[0].Epoch != 3 || ls[0].ID != rep.Lease.ID {
		t.Fatalf("active leases: %+v (%v)", ls, err)
	}
	if d, _ := w.store.Desktop(w.desktop); d.Lease != "" {
		t.Errorf("an expired lease shows as %q", d.Lease)
	}
	second := ls[0]
	second.ID, second.Epoch = newLeaseID(), 4
	err = w.srv.st.Update(func(tx *catalog.Tx) error { return putLease(tx, &second) })
	if err == nil {
		t.Error("the catalog took a second active lease of one desktop")
	}
}

// TestFailedExportTakesNoLease: an export that fails takes no lease and renews
// none: before the lease (the bundle file exists) and after it (a write fails).
func TestFailedExportTakesNoLease(t *testing.T) {
	ctx := context.Background()
	w := newWorld(t, smallSpec())
	lease := func() *proto.Lease {
		t.Helper()
		st, err := w.srv.DesktopStatus(w.desktop)
		if err != nil {
			t.Fatal(err)
		}
		return st.Lease
	}
	dir := t.TempDir()
	exists := filepath.Join(dir, "exists.cvdb")
	os.WriteFile(exists, []byte("keep me"), 0o644)
	if _, err := w.srv.Export(ctx, w.desktop, exists, ExportOptions{TTL: time.Hour, Device: "laptop1"}); err == nil {
		t.Fatal("export over an existing file succeeded")
	}
	if b, _ := os.ReadFile(exists); string(b) != "keep me" || lease() != nil {
		t.Fatalf("after a refused export: file %q, lease %+v", b, lease())
	}
	boom := errors.New("injected write failure")
	w.srv.failpoint = func(step string) error {
		if step == "export:write" {
			return boom
		}
		return nil
	}
	bundle := filepath.Join(dir, "desk.cvdb")
	if _, err := w.srv.Export(ctx, w.desktop, bundle, ExportOptions{TTL: time.Hour, Device: "laptop1"}); !errors.Is(err, boom) {
		t.Fatalf("export with a failing write: %v", err)
	}
	if l := lease(); l != nil {
		t.Fatalf("a failed export left a lease: %+v", l)
	}
	if _, err := os.Stat(bundle); !os.IsNotExist(err) {
		t.Errorf("a failed export left its file: %v", err)
	}
	// A held lease is not renewed by a failed export.
	w.srv.failpoint = nil
	if _, err := w.srv.Export(ctx, w.desktop, bundle, ExportOptions{TTL: time.Hour, Device: "laptop1"}); err != nil {
		t.Fatal(err)
	}
	held := lease()
	w.srv.failpoint = func(step string) error {
		if step == "export:write" {
			return boom
		}
		return nil
	}
	if _, err := w.srv.Export(ctx, w.desktop, filepath.Join(dir, "again.cvdb"), ExportOptions{TTL: 48 * time.Hour, Device: "laptop1"}); !errors.Is(err, boom) {
		t.Fatalf("second export: %v", err)
	}
	if l := lease(); l == nil || l.ID != held.ID || !l.Expires.Equal(held.Expires) {
		t.Fatalf("a failed export changed the held lease: %+v, was %+v", l, held)
	}
}

// TestVersionKinds: each version says how it was made, and a check-in's version
// carries the check-in's ID (the laptop's mirror too).
func TestVersionKinds(t *testing.T) {
	ctx := context.Background()
	w := newWorld(t, smallSpec())
	lap := newLaptop(t, "laptop")
	if _, err := lap.lp.CheckOut(ctx, w.client(w.token), w.desktop, laptop.CheckoutOptions{}); err != nil {
		t.Fatal(err)
	}
	writeTop(t, lap, w.desktop, proto.DiskSystem, []write{{off: 0, data: testutil.Fill(9, 1*MiB, false)}})
	if _, err := lap.lp.CheckIn(ctx, w.desktop, laptop.CheckinOptions{}); err != nil {
		t.Fatal(err)
	}
	_, head := w.head()
	if head.Kind != images.VersionCheckin || len(head.Checkin) < 12 || !strings.HasSuffix(head.Note, head.Checkin[:12]) {
		t.Fatalf("check-in version: %+v", head)
	}
	ld, _ := lap.store.Desktop(w.desktop)
	if lv := ld.HeadVersion(); lv.Kind != images.VersionCheckin || lv.Checkin != head.Checkin {
		t.Errorf("the laptop's mirror: %+v", lv)
	}
	if _, err := w.srv.Rollback(ctx, w.desktop, 1); err != nil {
		t.Fatal(err)
	}
	if _, v := w.head(); v.Kind != images.VersionRollback {
		t.Errorf("rollback version: %+v", v)
	}
	// The laptop's next check-in no longer starts from the head: a conflict.
	writeTop(t, lap, w.desktop, proto.DiskSystem, []write{{off: 2 * MiB, data: testutil.Fill(10, 1*MiB, false)}})
	rep, err := lap.lp.CheckIn(ctx, w.desktop, laptop.CheckinOptions{})
	if err != nil {
		t.Fatal(err)
	}
	st, _ := w.srv.DesktopStatus(w.desktop)
	var cv *proto.Version
	for i := range st.Versions {
		if st.Versions[i].N == rep.Version {
			cv = &st.Versions[i]
		}
	}
	if cv == nil || cv.Kind != images.VersionConflict || !cv.Conflict || cv.Checkin == "" {
		t.Errorf("conflict version: %+v (report %+v)", cv, rep)
	}
	if first := st.Versions[0]; first.Kind != images.VersionCreate {
		t.Errorf("first version: %+v", first)
	}
}

// TestHostileBundles: an import refuses a bundle that lies about its layers'
// data, one whose xz stream is cut or corrupt at its end, and one with bytes
// after it; none leaves a layer behind.
func TestHostileBundles(t *testing.T) {
	ctx := context.Background()
	w := newWorld(t, smallSpec())
	bundle := filepath.Join(t.TempDir(), "desk.cvdb")
	if _, err := w.srv.Export(ctx, w.desktop, bundle, ExportOptions{}); err != nil {
		t.Fatal(err)
	}
	raw, err := os.ReadFile(bundle)
	if err != nil {
		t.Fatal(err)
	}
	// The payload, to rewrite its header.
	xr, err := xz.NewReader(bytes.NewReader(raw))
	if err != nil {
		t.Fatal(err)
	}
	payload, err := io.ReadAll(xr)
	if err != nil {
		t.Fatal(err)
	}
	hlen := binary.BigEndian.Uint32(payload[len(proto.BundleMagic):])
	hstart := len(proto.BundleMagic) + 4
	rewrite := func(edit func(h *proto.BundleHeader)) []byte {
		var h proto.BundleHeader
		if err := json.Unmarshal(payload[hstart:hstart+int(hlen)], &h); err != nil {
			t.Fatal(err)
		}
		edit(&h)
		hb, _ := json.Marshal(&h)
		var out bytes.Buffer
		xw, err := xz.NewWriter(&out)
		if err != nil {
			t.Fatal(err)
		}
		xw.Write([]byte(proto.BundleMagic))
		binary.Write(xw, binary.BigEndian, uint32(len(hb)))
		xw.Write(hb)
		xw.Write(payload[hstart+int(hlen):])
		xw.Close()
		return out.Bytes()
	}
	cases := []struct {
		name string
		file []byte
	}{
		{"negative data bytes", rewrite(func(h *proto.BundleHeader) { h.Layers[0].DataBytes = -1 << 40 })},
		{"more data than declared", rewrite(func(h *proto.BundleHeader) {
			for i := range h.Layers {
				h.Layers[i].DataClusters, h.Layers[i].DataBytes = 1, 1
			}
		})},
		{"bad layer id", rewrite(func(h *proto.BundleHeader) { h.Layers[0].ID = "../../etc" })},
		{"xz cut short", raw[:len(raw)-20]},
		{"xz checksum corrupt", func() []byte { b := slices.Clone(raw); b[len(b)-13] ^= 0x55; return b }()},
		{"bytes after the xz stream", append(slices.Clone(raw), []byte("trailing garbage")...)},
	}
	for i, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "bad.cvdb")
			if err := os.WriteFile(path, c.file, 0o600); err != nil {
				t.Fatal(err)
			}
			lap := newLaptop(t, fmt.Sprintf("lap%d", i))
			if _, err := lap.lp.ImportBundle(ctx, path); err == nil {
				t.Fatal("imported")
			} else {
				t.Logf("refused: %v", err)
			}
			if ls, _ := lap.store.Layers(); len(ls) != 0 {
				t.Errorf("a refused bundle left %d layers", len(ls))
			}
			if _, err := lap.store.Desktop(w.desktop); err == nil {
				t.Error("a refused bundle left a desktop")
			}
		})
	}
	// The bundle as exported still imports.
	lap := newLaptop(t, "good")
	if _, err := lap.lp.ImportBundle(ctx, bundle); err != nil {
		t.Fatal(err)
	}
}

// TestBundleZeroDataClusters: a bundle whose stream sends clusters of zeros as
// data frames imports with the layer's ID (which lists them as zero) and stores
// them as zero, not as data; the data clusters it declared bound what it writes.
func TestBundleZeroDataClusters(t *testing.T) {
	testutil.NeedQemu(t)
	ctx := context.Background()
	const size, cs = 4 * MiB, 64 << 10
	c0, c2 := testutil.Fill(7, cs, false), testutil.Fill(8, cs, false)
	zero := make([]byte, cs)
	h := images.NewIDHasher("", size, cs)
	h.AddData(0, c0)
	h.AddData(2, c2)
	info := proto.LayerInfo{ID: h.Sum(), Kind: string(images.KindBase), Size: size, ClusterSize: cs,
		LayerStats: images.LayerStats{Clusters: 2, DataClusters: 2, DataBytes: 2 * cs}}
	hdr := proto.BundleHeader{Desktop: "zd", Version: 1, Created: time.Now().UTC(), Expires: time.Now().Add(time.Hour).UTC(),
		Disks: []proto.DiskManifest{{Name: proto.DiskSystem, Layers: []proto.LayerInfo{info}}}, Layers: []proto.LayerInfo{info}}
	var out bytes.Buffer
	xw, err := xz.NewWriter(&out)
	if err != nil {
		t.Fatal(err)
	}
	hb, _ := json.Marshal(&hdr)
	xw.Write([]byte(proto.BundleMagic))
	binary.Write(xw, binary.BigEndian, uint32(len(hb)))
	xw.Write(hb)
	sw := proto.NewStreamWriter(xw)
	for i, b := range [][]byte{c0, zero, c2} {
		ec, err := proto.EncodeCluster(0, int64(i), b, nil, proto.EncodeOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if err := sw.Data(ec); err != nil {
			t.Fatal(err)
		}
	}
	id, _ := hex.DecodeString(info.ID)
	if err := sw.End(3, id); err != nil {
		t.Fatal(err)
	}
	sw.Flush()
	xw.Close()
	path := filepath.Join(t.TempDir(), "zd.cvdb")
	if err := os.WriteFile(path, out.Bytes(), 0o600); err != nil {
		t.Fatal(err)
	}
	lap := newLaptop(t, "lap")
	if _, err := lap.lp.ImportBundle(ctx, path); err != nil {
		t.Fatal(err)
	}
	l, err := lap.store.Layer(info.ID)
	if err != nil {
		t.Fatal(err)
	}
	img, err := disk.Open(lap.store.LayerPath(l.ID), disk.OpenOptions{ReadOnly: true, NoBacking: true})
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	runs, err := images.LayerRuns(img, 0, size, cs)
	if err != nil {
		t.Fatal(err)
	}
	var data int64
	for _, r := range runs {
		if r.Data {
			data += r.Last - r.First + 1
		}
	}
	if data != 2 {
		t.Errorf("the imported layer holds %d data clusters, want 2 (the cluster of zeros stored as zero): %+v", data, runs)
	}
}

// TestReferencesThroughAnotherServer: a check-out through one server of the
// site whose layer streams go to another (a load balancer's choice) still gets
// the clusters the laptop holds as references: what it said it holds is in the
// catalog, not in the first server's memory.
func TestReferencesThroughAnotherServer(t *testing.T) {
	ctx := context.Background()
	spec := repeatSpec()
	w := newWorld(t, spec)
	other, err := NewServer(w.store, ServerOptions{Logger: testLogger()})
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	if err := other.ensureIndexed(ctx); err != nil {
		t.Fatal(err)
	}
	a, b := w.srv.Handler(), other.Handler()
	lb := httptest.NewServer(http.HandlerFunc(func(rw http.ResponseWriter, r *http.Request) {
		if strings.HasSuffix(r.URL.Path, "/checkout") {
			a.ServeHTTP(rw, r)
		} else {
			b.ServeHTTP(rw, r)
		}
	}))
	defer lb.Close()
	c, err := laptop.NewClient(lb.URL, w.token, laptop.ClientOptions{})
	if err != nil {
		t.Fatal(err)
	}
	src := t.TempDir()
	makeImage(t, filepath.Join(src, "base.qcow2"), spec.baseSize, "", spec.baseWrites)
	lap := newLaptop(t, "laptop")
	if _, _, err := lap.store.Import(ctx, filepath.Join(src, "base.qcow2"), images.ImportOptions{}); err != nil {
		t.Fatal(err)
	}
	rep, err := lap.lp.CheckOut(ctx, c, w.desktop, laptop.CheckoutOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if rep.ClustersByRef != 32 {
		t.Errorf("%d clusters by reference through the other server, want 32", rep.ClustersByRef)
	}
	qemuCompare(t, w.store.LayerPath(w.app), lap.top(w.desktop, proto.DiskSystem))
}
