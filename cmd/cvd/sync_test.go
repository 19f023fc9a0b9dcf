package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"math/rand/v2"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/cvd-project/cvd/syncd/laptop"

	"github.com/cvd-project/cvd/disk"
	"github.com/cvd-project/cvd/images"
	"github.com/cvd-project/cvd/internal/testutil"
	"github.com/cvd-project/cvd/syncd"
	"github.com/cvd-project/cvd/syncd/proto"
)

// syncServer is a server store with a desktop, served on loopback by the test
// process; the laptops are the built cvd binary running as child processes.
type syncServer struct {
	t     *testing.T
	dir   string
	store *images.Store
	srv   *syncd.Server
	http  *httptest.Server
	token string
}

func newSyncServer(t *testing.T) *syncServer {
	t.Helper()
	testutil.NeedQemu(t)
	src := t.TempDir()
	base, app := filepath.Join(src, "base.qcow2"), filepath.Join(src, "app.qcow2")
	testutil.Run(t, "qemu-img", "create", "-q", "-f", "qcow2", base, "1G")
	testutil.Run(t, "qemu-io", "-c", "write -P 0x11 0 48M", "-c", "write -P 0x22 256M 16M", base)
	randomInto(t, base, 64*1<<20, 32<<20, 1)
	testutil.Run(t, "qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", app)
	randomInto(t, app, 512<<20, 16<<20, 2)
	s := &syncServer{t: t, dir: filepath.Join(t.TempDir(), "server")}
	st, err := images.Open(s.dir, images.OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	s.store = st
	ctx := context.Background()
	bl, _, err := st.Import(ctx, base, images.ImportOptions{})
	if err != nil {
		t.Fatal(err)
	}
	al, _, err := st.Import(ctx, app, images.ImportOptions{Parent: bl.ID})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := st.CreateDesktop(ctx, "desk", images.DesktopSpec{Base: bl.ID, Apps: []string{al.ID}, UserSize: 256 << 20}); err != nil {
		t.Fatal(err)
	}
	s.srv, err = syncd.NewServer(st, syncd.ServerOptions{})
	if err != nil {
		t.Fatal(err)
	}
	s.http = httptest.NewServer(s.srv.Handler())
	_, s.token, err = s.srv.AddDevice("laptop", syncd.DeviceOptions{Desktops: []string{"desk"}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		s.http.Close()
		s.srv.Close()
		st.Close()
		checkQcow2Under(t, s.dir)
	})
	return s
}

// randomInto writes n pseudo-random bytes at off into an image through qemu-io's
// file-backed write (qemu-io has no random pattern).
func randomInto(t *testing.T, img string, off, n int64, seed uint64) {
	t.Helper()
	r := rand.New(rand.NewPCG(seed, seed*7))
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(r.Uint32())
	}
	d, err := disk.Open(img, disk.OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	if _, err := d.WriteAt(b, off); err != nil {
		t.Fatal(err)
	}
	if err := d.Flush(); err != nil {
		t.Fatal(err)
	}
}

func checkQcow2Under(t *testing.T, dir string) {
	t.Helper()
	filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err == nil && !d.IsDir() && strings.HasSuffix(p, ".qcow2") && !strings.HasPrefix(d.Name(), images.TempPrefix) {
			testutil.QemuCheck(t, p)
		}
		return nil
	})
}

func (s *syncServer) head() proto.Version {
	s.t.Helper()
	st, err := s.srv.DesktopStatus("desk")
	if err != nil {
		s.t.Fatal(err)
	}
	for _, v := range st.Versions {
		if v.N == st.Head {
			return v
		}
	}
	s.t.Fatal("no head")
	return proto.Version{}
}

// cvdProc starts the cvd binary on a laptop store.
func cvdProc(bin, store string, args ...string) *exec.Cmd {
	cmd := exec.Command(bin, append([]string{"--store", store, "--json"}, args...)...)
	cmd.Env = append(os.Environ(), "CVD_STORE=")
	return cmd
}

// runJSON runs cvd to completion and decodes its JSON report.
func runJSON(t *testing.T, bin, store string, v any, args ...string) time.Duration {
	t.Helper()
	start := time.Now()
	cmd := cvdProc(bin, store, args...)
	var errb strings.Builder
	cmd.Stderr = &errb
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("cvd %s: %v\n%s%s", strings.Join(args, " "), err, out, errb.String())
	}
	if v != nil {
		if err := json.Unmarshal(out, v); err != nil {
			t.Fatalf("cvd %s: %v\n%s", strings.Join(args, " "), err, out)
		}
	}
	return time.Since(start)
}

// killAfter starts cvd and SIGKILLs it after d (if it is still running). It
// reports whether the kill landed before the command finished.
func killAfter(t *testing.T, bin, store string, d time.Duration, args ...string) bool {
	t.Helper()
	cmd := cvdProc(bin, store, args...)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case <-done:
		return false
	case <-time.After(d):
		cmd.Process.Signal(syscall.SIGKILL)
		<-done
		return true
	}
}

// laptopWrite writes 48 MiB of random data (from seed), 16 MiB copied from the base
// and 8 MiB of zeros on the laptop's system disk, and returns the ID the check-in
// of that top must give its layer.
func laptopWrite(t *testing.T, store string, seed uint64) string {
	t.Helper()
	return laptopWriteN(t, store, seed, 48<<20)
}

// laptopWriteN is laptopWrite with n bytes of random data (at most 300 MiB).
func laptopWriteN(t *testing.T, store string, seed uint64, n int64) string {
	t.Helper()
	top := filepath.Join(store, "desktops", "desk.system.qcow2")
	img, err := disk.Open(top, disk.OpenOptions{AllowedRoots: []string{store}})
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	r := rand.New(rand.NewPCG(seed, 98))
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(r.Uint32())
	}
	if _, err := img.WriteAt(b, 700<<20); err != nil {
		t.Fatal(err)
	}
	cp := make([]byte, 16<<20)
	img.ReadAt(cp, 64<<20)
	if _, err := img.WriteAt(cp, 800<<20); err != nil {
		t.Fatal(err)
	}
	if err := img.WriteZeroes(0, 8<<20); err != nil {
		t.Fatal(err)
	}
	if err := img.Flush(); err != nil {
		t.Fatal(err)
	}
	own, err := disk.Open(top, disk.OpenOptions{ReadOnly: true, NoBacking: true})
	if err != nil {
		t.Fatal(err)
	}
	defer own.Close()
	parent := strings.TrimSuffix(filepath.Base(own.Info().BackingName), ".qcow2")
	id, _, err := images.ComputeID(context.Background(), own, parent)
	if err != nil {
		t.Fatal(err)
	}
	return id
}

// TestSyncKilledClient kills `cvd checkout` and `cvd checkin` at random moments;
// each time a rerun completes with the same result, and the server's head never
// moves before a check-in's commit.
func TestSyncKilledClient(t *testing.T) {
	rounds := 10
	if testing.Short() {
		rounds = 3
	}
	bin := buildCvd(t)
	s := newSyncServer(t)
	rng := rand.New(rand.NewPCG(uint64(time.Now().UnixNano()), 1))
	work := t.TempDir()

	// The reference: an uninterrupted check-out (its server-side seal is none: the
	// server's tops are empty).
	ref := filepath.Join(work, "ref")
	var refRep laptop.CheckoutReport
	tOut := runJSON(t, bin, ref, &refRep, "checkout", "desk", "--server", s.http.URL, "--token", s.token)
	head0 := s.head()
	t.Logf("reference check-out: %d layers, %d bytes in %v", len(refRep.LayersFetched), refRep.Bytes, tOut)

	var killedMid int
	for i := range rounds {
		store := filepath.Join(work, fmt.Sprintf("out%d", i))
		d := time.Duration(float64(tOut) * (0.05 + 0.9*rng.Float64()))
		mid := killAfter(t, bin, store, d, "checkout", "desk", "--server", s.http.URL, "--token", s.token)
		if h := s.head(); h.N != head0.N {
			t.Fatalf("round %d: a check-out moved the head to %d", i, h.N)
		}
		var rep laptop.CheckoutReport
		runJSON(t, bin, store, &rep, "checkout", "desk", "--server", s.http.URL, "--token", s.token)
		if mid {
			killedMid++
		}
		for _, dn := range []string{"system", "user"} {
			a := filepath.Join(store, "desktops", "desk."+dn+".qcow2")
			b := filepath.Join(ref, "desktops", "desk."+dn+".qcow2")
			if !testutil.QemuCompare(t, a, b) {
				t.Fatalf("round %d: the %s disk differs from the reference", i, dn)
			}
		}
		if rep.Bytes > refRep.Bytes {
			t.Errorf("round %d: the rerun moved %d bytes, a whole check-out %d", i, rep.Bytes, refRep.Bytes)
		}
		t.Logf("check-out round %d: killed after %v (mid-run %v); rerun fetched %d layers (held %d), %d bytes",
			i, d.Round(time.Millisecond), mid, len(rep.LayersFetched), len(rep.LayersHeld), rep.Bytes)
		checkQcow2Under(t, store)
		mustCvd(t, store, "store", "check")
	}
	t.Logf("check-out: %d of %d kills landed mid-run", killedMid, rounds)

	// Check-ins: every round starts from the same head layers (a rollback between
	// rounds) and writes new data; its result must be the layer an uninterrupted
	// check-in makes (the ID of the laptop's top) and read as the laptop's chain.
	lap := filepath.Join(work, "lap-ref")
	runJSON(t, bin, lap, nil, "checkout", "desk", "--server", s.http.URL, "--token", s.token)
	want := laptopWrite(t, lap, 1000)
	var refIn laptop.CheckinReport
	tIn := runJSON(t, bin, lap, &refIn, "checkin", "desk")
	if refIn.Layers["system"] != want {
		t.Fatalf("reference check-in made layer %s, the top's ID is %s", refIn.Layers["system"], want)
	}
	t.Logf("reference check-in: %d clusters sent, payload %d bytes, %d deduplicated, in %v", refIn.Sent, refIn.Payload, refIn.Deduplicated, tIn)
	killedMid = 0
	for i := range rounds {
		if _, err := s.srv.Rollback(context.Background(), "desk", head0.N); err != nil {
			t.Fatal(err)
		}
		before := s.head()
		store := filepath.Join(work, fmt.Sprintf("in%d", i))
		runJSON(t, bin, store, nil, "checkout", "desk", "--server", s.http.URL, "--token", s.token)
		refLayer := laptopWrite(t, store, uint64(i))
		expected := filepath.Join(work, fmt.Sprintf("expected%d.qcow2", i))
		testutil.Run(t, "qemu-img", "convert", "-O", "qcow2", filepath.Join(store, "desktops", "desk.system.qcow2"), expected)
		u := rng.Float64()
		d := time.Duration(float64(tIn) * (0.05 + 0.9*u*u)) // biased early: the upload is the short first part
		mid := killAfter(t, bin, store, d, "checkin", "desk")
		after := s.head()
		committed := after.N != before.N
		switch {
		case !committed:
		case after.N == before.N+1 && after.System == refLayer:
		default:
			t.Fatalf("round %d: after the kill the head is %+v (before %+v)", i, after, before)
		}
		var rep laptop.CheckinReport
		runJSON(t, bin, store, &rep, "checkin", "desk")
		final := s.head()
		if rep.NoChanges && committed {
			// The killed run had frozen its tops too: nothing left to do.
			rep.Layers = map[string]string{"system": final.System}
		}
		if final.N != before.N+1 || final.System != refLayer || rep.Layers["system"] != refLayer {
			t.Fatalf("round %d: the rerun made head %d with layer %s, want %d with %s", i, final.N, final.System[:12], before.N+1, refLayer[:12])
		}
		if !testutil.QemuCompare(t, s.store.LayerPath(final.System), expected) {
			t.Fatalf("round %d: the server's head differs from the laptop's chain", i)
		}
		if mid {
			killedMid++
		}
		t.Logf("check-in round %d: killed after %v (mid-run %v, committed before the kill %v); rerun resumed %v, no changes left %v, sent %d clusters (%d bytes)",
			i, d.Round(time.Millisecond), mid, committed, rep.Resumed, rep.NoChanges, rep.Sent, rep.Payload)
		checkQcow2Under(t, store)
		mustCvd(t, store, "store", "check")
	}
	t.Logf("check-in: %d of %d kills landed mid-run", killedMid, rounds)
}

// TestDesktopRmRefusedWhileHeld: a desktop a device holds is not removed, and the
// refusal names the holder; once the lease is broken it is.
func TestDesktopRmRefusedWhileHeld(t *testing.T) {
	bin := buildCvd(t)
	s := newSyncServer(t)
	runJSON(t, bin, filepath.Join(t.TempDir(), "lap"), nil, "checkout", "desk", "--server", s.http.URL, "--token", s.token)
	_, err := cvdIn(t, s.dir, "desktop", "rm", "desk")
	if !errors.Is(err, proto.ErrLeaseHeld) || !strings.Contains(err.Error(), "laptop") {
		t.Fatalf("desktop rm of a checked-out desktop: %v, want a refusal naming device laptop", err)
	}
	if _, err := s.store.Desktop("desk"); err != nil {
		t.Fatalf("the desktop is gone after the refusal: %v", err)
	}
	mustCvd(t, s.dir, "device", "break-lease", "desk")
	mustCvd(t, s.dir, "desktop", "rm", "desk")
}

// TestStatusShowsUnsent: cvd status shows the changes a laptop holds that no
// check-in took yet, and none after the check-in.
func TestStatusShowsUnsent(t *testing.T) {
	bin := buildCvd(t)
	s := newSyncServer(t)
	lap := filepath.Join(t.TempDir(), "lap")
	runJSON(t, bin, lap, nil, "checkout", "desk", "--server", s.http.URL, "--token", s.token)
	unsent := func() (n, b int64) {
		t.Helper()
		var st []statusLine
		runJSON(t, bin, lap, &st, "status", "desk")
		if len(st) != 1 {
			t.Fatalf("status: %+v", st)
		}
		for _, u := range st[0].Unsent {
			n, b = n+u.Clusters, b+u.Bytes
		}
		return n, b
	}
	if n, _ := unsent(); n != 0 {
		t.Fatalf("right after the check-out: %d clusters not checked in", n)
	}
	laptopWrite(t, lap, 5) // 48 MiB new, 16 MiB copied, 8 MiB zeroed
	n, b := unsent()
	if n != (48+16+8)<<20/65536 || b != (48+16)<<20 {
		t.Errorf("after writing: %d clusters, %d bytes not checked in; want %d, %d", n, b, (48+16+8)<<20/65536, (48+16)<<20)
	}
	runJSON(t, bin, lap, nil, "checkin", "desk")
	if n, _ := unsent(); n != 0 {
		t.Errorf("after the check-in: %d clusters not checked in", n)
	}
}

// TestDesktopPrune: prune keeps the head and the version a device's lease
// stands on, and removes the rest; gc then runs clean.
func TestDesktopPrune(t *testing.T) {
	bin := buildCvd(t)
	s := newSyncServer(t)
	lap := filepath.Join(t.TempDir(), "lap")
	runJSON(t, bin, lap, nil, "checkout", "desk", "--server", s.http.URL, "--token", s.token)
	leased := s.head().N
	for seed := range 2 {
		laptopWrite(t, lap, uint64(seed+20))
		runJSON(t, bin, lap, nil, "checkin", "desk")
	}
	head := s.head().N
	var rep struct {
		Removed []proto.Version `json:"removed"`
	}
	if err := json.Unmarshal([]byte(mustCvd(t, s.dir, "--json", "desktop", "prune", "desk", "--keep", "0")), &rep); err != nil {
		t.Fatal(err)
	}
	var versions syncd.DesktopVersions
	json.Unmarshal([]byte(mustCvd(t, s.dir, "--json", "desktop", "versions", "desk")), &versions)
	var left []int
	for _, v := range versions.Versions {
		left = append(left, v.N)
	}
	if fmt.Sprint(left) != fmt.Sprint([]int{leased, head}) || len(rep.Removed) != head-2 {
		t.Fatalf("after prune --keep 0: versions %v (leased %d, head %d), removed %d", left, leased, head, len(rep.Removed))
	}
	mustCvd(t, s.dir, "gc")
	mustCvd(t, s.dir, "store", "check")
}
