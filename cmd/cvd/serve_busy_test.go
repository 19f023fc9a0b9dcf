package main

import (
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/cvd-project/cvd/syncd/laptop"

	"github.com/cvd-project/cvd/internal/testutil"
	"github.com/cvd-project/cvd/syncd"
)

// busyStore is a server store (a base, a second base to recompose onto, a
// desktop, a device) and a laptop that checked the desktop out from the built
// binary's `cvd serve`.
type busyStore struct {
	t        *testing.T
	bin      string
	srv, lap string
	token    string
}

func newBusyStore(t *testing.T) *busyStore {
	t.Helper()
	testutil.NeedQemu(t)
	b := &busyStore{t: t, bin: buildCvd(t)}
	work := t.TempDir()
	b.srv, b.lap = filepath.Join(work, "server"), filepath.Join(work, "laptop")
	for i, name := range []string{"os:1", "os:2"} {
		img := filepath.Join(work, fmt.Sprintf("base%d.qcow2", i))
		testutil.Run(t, "qemu-img", "create", "-q", "-f", "qcow2", img, "1G")
		testutil.Run(t, "qemu-io", "-c", fmt.Sprintf("write -P %d 0 32M", 0x11+i), "-c", "write -P 0x22 256M 8M", img)
		mustCvd(t, b.srv, "layer", "import", img, "--kind", "base", "--name", name)
	}
	mustCvd(t, b.srv, "desktop", "create", "desk", "--base", "os:1", "--user-size", "64M")
	var added struct {
		Token string `json:"token"`
	}
	json.Unmarshal([]byte(mustCvd(t, b.srv, "--json", "device", "add", "lap", "--desktop", "desk")), &added)
	b.token = added.Token
	return b
}

// admin runs one administrator's command on the server store and returns how
// long it took.
func (b *busyStore) admin(args ...string) (time.Duration, error) {
	start := time.Now()
	cmd := exec.Command(b.bin, append([]string{"--store", b.srv}, args...)...)
	cmd.Env = append(os.Environ(), "CVD_STORE=", "CVD_CONNECT=")
	out, err := cmd.CombinedOutput()
	if err != nil {
		err = fmt.Errorf("cvd %s: %w\n%s", strings.Join(args, " "), err, out)
	}
	return time.Since(start), err
}

// TestServeBusyStore: with `cvd serve` running and a check-in of 64 MiB
// streaming, the administrator's commands run on the same store from other
// processes and succeed, and the check-in commits.
func TestServeBusyStore(t *testing.T) {
	b := newBusyStore(t)
	srv := startServe(t, b.bin, b.srv)
	runJSON(t, b.bin, b.lap, nil, "checkout", "desk", "--server", srv.url, "--token", b.token)
	want := laptopWrite(t, b.lap, 7)

	ci := cvdProc(b.bin, b.lap, "checkin", "desk")
	ciOut := &strings.Builder{}
	ci.Stdout, ci.Stderr = ciOut, ciOut
	if err := ci.Start(); err != nil {
		t.Fatal(err)
	}
	ciDone := make(chan error, 1)
	go func() { ciDone <- ci.Wait() }()
	cmds := [][]string{
		{"desktop", "ls"},
		{"layer", "ls"},
		{"device", "add", "extra", "--desktop", "desk"},
		{"clone", "desk", "--name", "c", "--count", "100"},
		{"recompose", "desk", "--base", "os:2", "--dry-run"},
		{"desktop", "versions", "desk"},
		{"store", "check"},
	}
	var wg sync.WaitGroup
	took := make([]time.Duration, len(cmds))
	errs := make([]error, len(cmds))
	for i, args := range cmds {
		wg.Add(1)
		go func() {
			defer wg.Done()
			took[i], errs[i] = b.admin(args...)
		}()
	}
	wg.Wait()
	var overlapped bool
	select {
	case err := <-ciDone:
		ciDone <- err
	default:
		overlapped = true
	}
	for i, args := range cmds {
		if errs[i] != nil {
			// A recompose dry-run may report conflicts (exit 3); nothing else may fail.
			if !(args[0] == "recompose" && strings.Contains(errs[i].Error(), "exit status 3")) {
				t.Errorf("beside the server: %v", errs[i])
			}
		}
		t.Logf("cvd %-40s %v", strings.Join(args, " "), took[i].Round(time.Millisecond))
	}
	if err := <-ciDone; err != nil {
		t.Fatalf("check-in beside the commands: %v\n%s", err, ciOut)
	}
	t.Logf("the commands ran while the check-in was still running: %v", overlapped)
	var versions syncd.DesktopVersions
	json.Unmarshal([]byte(mustCvd(t, b.srv, "--json", "desktop", "versions", "desk")), &versions)
	if h := versions.HeadVersion(); h == nil || h.System != want {
		t.Fatalf("head after the check-in: %+v, want layer %s", h, want[:12])
	}
	var clones []json.RawMessage
	json.Unmarshal([]byte(mustCvd(t, b.srv, "--json", "clone", "ls")), &clones)
	if len(clones) != 100 {
		t.Errorf("%d clones, want 100", len(clones))
	}
	srv.stop()
	mustCvd(t, b.srv, "store", "check")
	checkQcow2Under(t, b.srv)
}

// TestServeKilled: the server is SIGKILLed at random moments of a check-in
// while the administrator's commands run beside it; after each, a restarted
// server completes the check-in, no version is lost or doubled, and the store
// checks clean.
func TestServeKilled(t *testing.T) {
	rounds := 10
	if testing.Short() {
		rounds = 3
	}
	b := newBusyStore(t)
	srv := startServe(t, b.bin, b.srv)
	runJSON(t, b.bin, b.lap, nil, "checkout", "desk", "--server", srv.url, "--token", b.token)
	laptopWrite(t, b.lap, 100)
	tRef := runJSON(t, b.bin, b.lap, nil, "checkin", "desk")
	srv.stop()
	rng := rand.New(rand.NewPCG(uint64(time.Now().UnixNano()), 3))
	var layers []string
	killedMid := 0
	for i := range rounds {
		want := laptopWrite(t, b.lap, uint64(i))
		layers = append(layers, want)
		srv := startServe(t, b.bin, b.srv)
		ci := cvdProc(b.bin, b.lap, "checkin", "desk", "--server", srv.url)
		ci.Stdout, ci.Stderr = nil, nil
		if err := ci.Start(); err != nil {
			t.Fatal(err)
		}
		ciDone := make(chan struct{})
		go func() { ci.Wait(); close(ciDone) }()
		var wg sync.WaitGroup
		for _, args := range [][]string{{"desktop", "ls"}, {"clone", "desk", "--name", fmt.Sprintf("k%d", i)}, {"desktop", "versions", "desk"}} {
			wg.Add(1)
			go func() {
				defer wg.Done()
				if _, err := b.admin(args...); err != nil {
					t.Errorf("round %d, beside the server: %v", i, err)
				}
			}()
		}
		d := time.Duration(float64(tRef) * (0.05 + 1.2*rng.Float64()))
		time.Sleep(d)
		select {
		case <-ciDone:
		default:
			killedMid++
		}
		srv.kill()
		<-ciDone
		wg.Wait()

		srv2 := startServe(t, b.bin, b.srv)
		var rep laptop.CheckinReport
		runJSON(t, b.bin, b.lap, &rep, "checkin", "desk", "--server", srv2.url)
		srv2.stop()
		var versions syncd.DesktopVersions
		json.Unmarshal([]byte(mustCvd(t, b.srv, "--json", "desktop", "versions", "desk")), &versions)
		if h := versions.HeadVersion(); h == nil || h.System != want {
			t.Fatalf("round %d (killed after %v): head %+v, want layer %s", i, d, h, want[:12])
		}
		seenN := map[int]bool{}
		for _, v := range versions.Versions {
			if seenN[v.N] {
				t.Fatalf("round %d: version %d twice", i, v.N)
			}
			seenN[v.N] = true
		}
		for j, l := range layers {
			n := 0
			for _, v := range versions.Versions {
				if v.System == l {
					n++
				}
			}
			if n != 1 {
				t.Fatalf("round %d: the layer of round %d's check-in is in %d versions, want 1", i, j, n)
			}
		}
		mustCvd(t, b.srv, "store", "check")
		t.Logf("round %d: server killed after %v; the rerun resumed %v, sent %d clusters", i, d.Round(time.Millisecond), rep.Resumed, rep.Sent)
	}
	t.Logf("%d of %d kills landed while the check-in ran", killedMid, rounds)
	checkQcow2Under(t, b.srv)
	checkQcow2Under(t, b.lap)
	mustCvd(t, b.lap, "store", "check")
}
