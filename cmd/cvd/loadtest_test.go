package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/cvd-project/cvd/disk"
	"github.com/cvd-project/cvd/images"
	"github.com/cvd-project/cvd/internal/testutil"
	"github.com/cvd-project/cvd/syncd"
	"github.com/cvd-project/cvd/syncd/laptop"
	"github.com/cvd-project/cvd/syncd/proto"
)

// The load test (make loadtest): a site of three `cvd serve` on one PostgreSQL
// catalog and one store directory, behind a real round-robin proxy (haproxy),
// with simulated laptops, each on a desktop of its own, doing rounds of
// check-out → write → check-in, while an administrator clones and recomposes
// other desktops, and one server is SIGKILLed and restarted midway. It runs only
// when CVD_LOADTEST names its length (5m); the rest of its knobs:
// CVD_LOADTEST_LAPTOPS (50), CVD_LOADTEST_WRITE (8 MiB per round),
// CVD_LOADTEST_SERVERS (3; with one, none is killed), and
// CVD_LOADTEST_DIR (where the site's store goes; the test's temporary directory
// else) and CVD_LOADTEST_LAPTOP_DIR (the laptops' stores; the same else). Each
// round adds its bytes to the site and to its laptop: a file system with less
// than 1 GiB free ends the run early, which the report says.
// It reports (t.Log, and CVD_LOADTEST_JSON names a file for the figures): rounds
// per second, check-in latency p50 and p99, bytes moved per round against the
// bytes changed, versions lost and unexpected conflicts (both must be 0), the
// servers' largest RSS, and `cvd store check` of the site at the end.

// loadReport is the load test's figures.
type loadReport struct {
	Seconds            float64 `json:"seconds"`
	Laptops            int     `json:"laptops"`
	Servers            int     `json:"servers"`
	Rounds             int64   `json:"rounds"`
	RoundsPerSec       float64 `json:"rounds_per_s"`
	CheckinP50         float64 `json:"checkin_p50_s"`
	CheckinP99         float64 `json:"checkin_p99_s"`
	CheckoutP50        float64 `json:"checkout_p50_s"`
	ChangedPerRound    float64 `json:"changed_bytes_per_round"`
	MovedPerRound      float64 `json:"moved_bytes_per_round"` // cluster streams and metadata, both ways
	MovedOverChanged   float64 `json:"moved_over_changed"`
	InitialCheckout    int64   `json:"initial_checkout_bytes"` // every laptop's first check-out (the base), not in the rounds
	StoppedEarly       string  `json:"stopped_early,omitempty"`
	Retries            int64   `json:"retries"` // operations run again after a failure (the killed server)
	VersionsLost       int     `json:"versions_lost"`
	UnexpectedConflict int64   `json:"unexpected_conflicts"`
	MaxServerRSS       int64   `json:"max_server_rss_bytes"`
	AdminClones        int64   `json:"admin_clones"`
	AdminRecomposes    int64   `json:"admin_recomposes"`
	StoreCheck         string  `json:"store_check"`
}

func envInt(name string, def int) int {
	if v, err := strconv.Atoi(os.Getenv(name)); err == nil && v > 0 {
		return v
	}
	return def
}

func freePort(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// startHaproxy runs haproxy in the foreground, round-robin over backends, with
// health checks on /v1/health (a killed server leaves the rotation within two
// seconds and comes back when it answers again).
func startHaproxy(t *testing.T, dir string, port int, backends []string) {
	t.Helper()
	cfg := fmt.Sprintf(`global
  maxconn 8192
defaults
  mode http
  timeout connect 5s
  timeout client 10m
  timeout server 10m
  retries 2
  option redispatch
frontend site
  bind 127.0.0.1:%d
  default_backend servers
backend servers
  balance roundrobin
  option httpchk GET /v1/health
  default-server inter 1s fall 2 rise 1
`, port)
	for i, b := range backends {
		cfg += fmt.Sprintf("  server s%d %s check\n", i+1, b)
	}
	path := filepath.Join(dir, "haproxy.cfg")
	if err := os.WriteFile(path, []byte(cfg), 0o644); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("haproxy", "-db", "-f", path)
	logf, _ := os.Create(filepath.Join(dir, "haproxy.log"))
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		if c, err := net.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", port)); err == nil {
			c.Close()
			return
		}
		if time.Now().After(deadline) {
			log, _ := os.ReadFile(logf.Name())
			t.Fatalf("haproxy did not listen:\n%s", log)
		}
	}
}

// rss is a process's resident set in bytes (0 when gone).
func rss(pid int) int64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0
	}
	for _, l := range strings.Split(string(b), "\n") {
		if f := strings.Fields(l); len(f) >= 2 && f[0] == "VmRSS:" {
			kb, _ := strconv.ParseInt(f[1], 10, 64)
			return kb << 10
		}
	}
	return 0
}

// loadLaptop is one simulated laptop: its own store, a device bound to a
// desktop of its own, and the versions its check-ins committed.
type loadLaptop struct {
	name, desktop, token string
	st                   *images.Store
	lp                   *laptop.Laptop
	committed            map[int]string // version → system layer
}

func TestLoad(t *testing.T) {
	length, err := time.ParseDuration(os.Getenv("CVD_LOADTEST"))
	if err != nil {
		t.Skip("the load test runs with CVD_LOADTEST=DURATION (make loadtest)")
	}
	testutil.NeedQemu(t)
	if _, err := exec.LookPath("haproxy"); err != nil {
		t.Fatal("the load test needs haproxy (Debian package haproxy; make deps installs it)")
	}
	nLaptops := envInt("CVD_LOADTEST_LAPTOPS", 50)
	write := int64(envInt("CVD_LOADTEST_WRITE", 8<<20))
	work := os.Getenv("CVD_LOADTEST_DIR")
	if work == "" {
		work = t.TempDir()
	} else {
		work, err = os.MkdirTemp(work, "cvd-loadtest-")
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { os.RemoveAll(work) })
	}
	lapDir := work
	if d := os.Getenv("CVD_LOADTEST_LAPTOP_DIR"); d != "" {
		if lapDir, err = os.MkdirTemp(d, "cvd-loadtest-laptops-"); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { os.RemoveAll(lapDir) })
	}
	bin := buildCvd(t)
	pg := testutil.Postgres(t)
	site := filepath.Join(work, "site")

	// The site: two bases, a desktop per laptop, three admin desktops.
	for i, name := range []string{"os:1", "os:2"} {
		img := filepath.Join(work, fmt.Sprintf("base%d.qcow2", i))
		testutil.Run(t, "qemu-img", "create", "-q", "-f", "qcow2", img, "1G")
		randomInto(t, img, 0, 32<<20, uint64(10+i))
		args := []string{"layer", "import", img, "--kind", "base", "--name", name}
		if i == 0 {
			args = append([]string{"--catalog", pg}, args...)
		}
		mustCvd(t, site, args...)
	}
	var rep loadReport
	laps := make([]*loadLaptop, nLaptops)
	for i := range laps {
		l := &loadLaptop{name: fmt.Sprintf("lap%02d", i), desktop: fmt.Sprintf("d%02d", i), committed: map[int]string{}}
		mustCvd(t, site, "desktop", "create", l.desktop, "--base", "os:1")
		var added struct {
			Token string `json:"token"`
		}
		json.Unmarshal([]byte(mustCvd(t, site, "--json", "device", "add", l.name, "--desktop", l.desktop)), &added)
		l.token = added.Token
		if l.st, err = images.Open(filepath.Join(lapDir, l.name), images.OpenOptions{}); err != nil {
			t.Fatal(err)
		}
		if l.lp, err = laptop.OpenLaptop(l.st, laptop.LaptopOptions{}); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { l.lp.Close(); l.st.Close() })
		laps[i] = l
	}
	admins := []string{"adm1", "adm2", "adm3"}
	for _, a := range admins {
		mustCvd(t, site, "desktop", "create", a, "--base", "os:1")
	}

	// Three servers on fixed ports behind haproxy.
	nServers := envInt("CVD_LOADTEST_SERVERS", 3)
	rep.Servers = nServers
	addrs := make([]string, nServers)
	servers := make([]*serveProc, nServers)
	var srvMu sync.Mutex
	for i := range servers {
		addrs[i] = fmt.Sprintf("127.0.0.1:%d", freePort(t))
		servers[i] = startServeAt(t, bin, site, addrs[i])
	}
	proxyPort := freePort(t)
	startHaproxy(t, work, proxyPort, addrs)
	url := fmt.Sprintf("http://127.0.0.1:%d", proxyPort)

	ctx, cancel := context.WithTimeout(context.Background(), length)
	defer cancel()
	start := time.Now()
	rep.Laptops = nLaptops
	var (
		mu                       sync.Mutex
		checkins, checkouts      []float64
		moved, changed, initial  int64
		rounds, retries, conflic atomic.Int64
		failures                 []string
	)
	// retry runs op until it succeeds, or it failed 20 times; a check-out stops
	// at the end of the run, a check-in under way is finished (untilEnd false).
	retry := func(what string, untilEnd bool, op func() error) error {
		var err error
		for i := range 20 {
			if err = op(); err == nil {
				return nil
			}
			if untilEnd && ctx.Err() != nil {
				return err
			}
			if i == 0 {
				retries.Add(1)
			}
			time.Sleep(time.Duration(200+rand.IntN(800)) * time.Millisecond)
		}
		return fmt.Errorf("%s: %w", what, err)
	}
	var wg sync.WaitGroup
	for i, l := range laps {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(i), 77))
			buf := make([]byte, write)
			c, err := laptop.NewClient(url, l.token, laptop.ClientOptions{})
			if err != nil {
				t.Error(err)
				return
			}
			for ctx.Err() == nil {
				t0 := time.Now()
				var co *laptop.CheckoutReport
				if err := retry("check-out", true, func() (err error) {
					co, err = l.lp.CheckOut(ctx, c, l.desktop, laptop.CheckoutOptions{})
					return err
				}); err != nil {
					if ctx.Err() == nil {
						mu.Lock()
						failures = append(failures, fmt.Sprintf("%s: %v", l.name, err))
						mu.Unlock()
					}
					return
				}
				tCheckout := time.Since(t0).Seconds()
				// Write the round's bytes at a random place of the system disk.
				for j := range buf {
					buf[j] = byte(rng.Uint32())
				}
				d, _ := l.st.Desktop(l.desktop)
				img, err := disk.Open(l.st.Path(d.SystemDisk), disk.OpenOptions{AllowedRoots: []string{l.st.Dir()}})
				if err == nil {
					_, err = img.WriteAt(buf, rng.Int64N((1<<30-write)>>16)<<16)
					if ferr := img.Flush(); err == nil {
						err = ferr
					}
					img.Close()
				}
				if err != nil {
					t.Errorf("%s: write: %v", l.name, err)
					return
				}
				t1 := time.Now()
				var ci *laptop.CheckinReport
				var payload, meta int64
				err = retry("check-in", false, func() (err error) {
					ci, err = l.lp.CheckIn(context.WithoutCancel(ctx), l.desktop, laptop.CheckinOptions{})
					if ci != nil {
						payload += ci.Payload
						meta += ci.Metadata
					}
					return err
				})
				if err != nil {
					mu.Lock()
					failures = append(failures, fmt.Sprintf("%s: %v", l.name, err))
					mu.Unlock()
					return
				}
				lat := time.Since(t1).Seconds()
				if ci.Conflict {
					conflic.Add(1)
				}
				mu.Lock()
				l.committed[ci.Version] = ci.Layers[proto.DiskSystem]
				checkins = append(checkins, lat)
				checkouts = append(checkouts, tCheckout)
				if len(l.committed) == 1 {
					initial += co.Bytes // the first check-out fetches the base
					co.Bytes = 0
				}
				moved += payload + meta + co.Bytes
				if os.Getenv("CVD_LOADTEST_VERBOSE") != "" {
					t.Logf("%s: payload %d meta %d checkout %d sent %d changed %d", l.name, payload, meta, co.Bytes, ci.Sent, ci.Changed)
				}
				changed += ci.ChangedBytes
				mu.Unlock()
				rounds.Add(1)
			}
		}()
	}

	// The administrator clones and recomposes the admin desktops meanwhile.
	var clones, recomposes atomic.Int64
	wg.Add(1)
	go func() {
		defer wg.Done()
		for i := 0; ctx.Err() == nil; i++ {
			a := admins[i%len(admins)]
			if _, err := cvdIn(t, site, "clone", a, "--name", fmt.Sprintf("%s-%d", a, i), "--count", "4"); err != nil {
				t.Errorf("admin clone: %v", err)
			} else {
				clones.Add(4)
			}
			if i%5 == 4 {
				base := []string{"os:1", "os:2"}[(i/5)%2]
				if _, err := cvdIn(t, site, "recompose", a, "--base", base); err != nil {
					t.Errorf("admin recompose %s onto %s: %v", a, base, err)
				} else {
					recomposes.Add(1)
				}
			}
			select {
			case <-ctx.Done():
			case <-time.After(time.Second):
			}
		}
	}()

	// RSS of the servers, every second; server 2 killed at half time and
	// restarted 5 s later.
	wg.Add(1)
	go func() {
		defer wg.Done()
		var killAt <-chan time.Time
		if nServers > 1 {
			killAt = time.After(length / 2)
		}
		tick := time.NewTicker(time.Second)
		defer tick.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-killAt:
				srvMu.Lock()
				servers[1].kill()
				srvMu.Unlock()
				t.Logf("%.0fs: server 2 (%s) SIGKILLed", time.Since(start).Seconds(), addrs[1])
				time.Sleep(5 * time.Second)
				srvMu.Lock()
				servers[1] = startServeAt(t, bin, site, addrs[1])
				srvMu.Unlock()
				t.Logf("%.0fs: server 2 restarted", time.Since(start).Seconds())
			case <-tick.C:
				// Every round adds its bytes to both sides: a file system
				// about to fill up ends the run (reported), not the machine.
				for _, d := range []string{site, lapDir} {
					var fs syscall.Statfs_t
					if syscall.Statfs(d, &fs) == nil && int64(fs.Bavail)*fs.Bsize < 1<<30 {
						rep.StoppedEarly = fmt.Sprintf("%s has less than 1 GiB free after %.0fs", d, time.Since(start).Seconds())
						t.Log(rep.StoppedEarly)
						cancel()
					}
				}
				srvMu.Lock()
				for _, s := range servers {
					if !s.stopped {
						rep.MaxServerRSS = max(rep.MaxServerRSS, rss(s.cmd.Process.Pid))
					}
				}
				srvMu.Unlock()
			}
		}
	}()
	wg.Wait()
	rep.Seconds = time.Since(start).Seconds()
	for _, f := range failures {
		t.Errorf("round failed: %s", f)
	}

	// Every committed version is there, with its layer, once.
	for _, l := range laps {
		var v syncd.DesktopVersions
		json.Unmarshal([]byte(mustCvd(t, site, "--json", "desktop", "versions", l.desktop)), &v)
		have := map[int]string{}
		for _, x := range v.Versions {
			have[x.N] = x.System
		}
		for n, layer := range l.committed {
			if have[n] != layer {
				rep.VersionsLost++
				t.Errorf("%s: version %d (layer %.12s) lost: the site has %q", l.desktop, n, layer, have[n])
			}
		}
	}
	for _, s := range servers {
		s.stop()
	}
	out, err := cvdIn(t, site, "store", "check")
	rep.StoreCheck = strings.TrimSpace(out)
	if err != nil {
		t.Errorf("store check of the site: %v\n%s", err, out)
	}

	slices.Sort(checkins)
	slices.Sort(checkouts)
	pct := func(s []float64, p float64) float64 {
		if len(s) == 0 {
			return 0
		}
		return s[min(len(s)-1, int(float64(len(s))*p))]
	}
	rep.Rounds = rounds.Load()
	rep.RoundsPerSec = float64(rep.Rounds) / rep.Seconds
	rep.CheckinP50, rep.CheckinP99 = pct(checkins, 0.50), pct(checkins, 0.99)
	rep.CheckoutP50 = pct(checkouts, 0.50)
	if rep.Rounds > 0 {
		rep.ChangedPerRound = float64(changed) / float64(rep.Rounds)
		rep.MovedPerRound = float64(moved) / float64(rep.Rounds)
		rep.MovedOverChanged = rep.MovedPerRound / rep.ChangedPerRound
	}
	rep.Retries, rep.UnexpectedConflict = retries.Load(), conflic.Load()
	rep.InitialCheckout = initial
	rep.AdminClones, rep.AdminRecomposes = clones.Load(), recomposes.Load()
	b, _ := json.MarshalIndent(&rep, "", "  ")
	t.Logf("load test:\n%s", b)
	if p := os.Getenv("CVD_LOADTEST_JSON"); p != "" {
		os.WriteFile(p, b, 0o644)
	}
	if rep.Rounds == 0 {
		t.Error("no round completed")
	}
	if rep.UnexpectedConflict > 0 {
		t.Errorf("%d check-ins became conflicts: each laptop holds its desktop's only lease", rep.UnexpectedConflict)
	}
	if errors.Is(ctx.Err(), context.Canceled) {
		t.Log("cancelled")
	}
}
