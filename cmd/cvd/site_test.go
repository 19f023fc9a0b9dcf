package main

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/cvd-project/cvd/internal/testutil"
	"github.com/cvd-project/cvd/syncd"
	"github.com/cvd-project/cvd/syncd/laptop"
)

// site is one store directory with its catalog on PostgreSQL, served by several
// `cvd serve` processes of the built binary.
type site struct {
	t        *testing.T
	bin      string
	dir      string
	tokens   map[string]string // device → token
	laptops  map[string]string // device → laptop store
	pg       string
	baseSize int64
}

func newSite(t *testing.T, devices ...string) *site {
	t.Helper()
	testutil.NeedQemu(t)
	s := &site{t: t, bin: buildCvd(t), pg: testutil.Postgres(t), tokens: map[string]string{}, laptops: map[string]string{}}
	work := t.TempDir()
	s.dir = filepath.Join(work, "site")
	img := filepath.Join(work, "base.qcow2")
	testutil.Run(t, "qemu-img", "create", "-q", "-f", "qcow2", img, "1G")
	testutil.Run(t, "qemu-io", "-c", "write -P 0x11 0 32M", "-c", "write -P 0x22 256M 8M", img)
	randomInto(t, img, 64<<20, 16<<20, 5)
	mustCvd(t, s.dir, "--catalog", s.pg, "layer", "import", img, "--kind", "base", "--name", "os:1")
	mustCvd(t, s.dir, "desktop", "create", "desk", "--base", "os:1", "--user-size", "64M")
	for _, d := range devices {
		var added struct {
			Token string `json:"token"`
		}
		json.Unmarshal([]byte(mustCvd(t, s.dir, "--json", "device", "add", d, "--desktop", "desk")), &added)
		s.tokens[d] = added.Token
		s.laptops[d] = filepath.Join(work, "laptop-"+d)
	}
	return s
}

func (s *site) versions() *syncd.DesktopVersions {
	s.t.Helper()
	var v syncd.DesktopVersions
	json.Unmarshal([]byte(mustCvd(s.t, s.dir, "--json", "desktop", "versions", "desk")), &v)
	return &v
}

// stagedBytes is the size of the largest staging file of the site's open
// check-ins.
func (s *site) stagedBytes() int64 {
	files, _ := filepath.Glob(filepath.Join(s.dir, "sync", "sessions", "*", "*.qcow2"))
	var n int64
	for _, f := range files {
		if fi, err := os.Stat(f); err == nil {
			n = max(n, fi.Size())
		}
	}
	return n
}

// TestSiteTwoServers: two `cvd serve` on one PostgreSQL catalog and one store
// directory act as one site. A lease taken through A is refused through B,
// naming its holder; what is checked in through A checks out through B and reads
// the same; a check-in cut by SIGKILL of A in mid-upload resumes through B and
// sends only what A had not received; a device whose lease was broken and taken
// by another device through the other server cannot make its check-in the head.
func TestSiteTwoServers(t *testing.T) {
	s := newSite(t, "lap1", "lap2")
	a, b := startServe(t, s.bin, s.dir), startServe(t, s.bin, s.dir)
	lap1, lap2 := s.laptops["lap1"], s.laptops["lap2"]

	// 1. The lease through A refuses a check-out through B.
	runJSON(t, s.bin, lap1, nil, "checkout", "desk", "--server", a.url, "--token", s.tokens["lap1"])
	cmd := cvdProc(s.bin, lap2, "checkout", "desk", "--server", b.url, "--token", s.tokens["lap2"])
	out, err := cmd.CombinedOutput()
	if err == nil || !strings.Contains(string(out), "lap1") {
		t.Fatalf("check-out through B while lap1 holds the lease through A: %v\n%s", err, out)
	}
	t.Logf("through B: %s", strings.TrimSpace(string(out)))

	// 2. Checked in through A, checked out through B: the same disk.
	want := laptopWrite(t, lap1, 1)
	var rep laptop.CheckinReport
	runJSON(t, s.bin, lap1, &rep, "checkin", "desk", "--release")
	if h := s.versions().HeadVersion(); h == nil || h.System != want {
		t.Fatalf("head after the check-in through A: %+v, want system layer %s", h, want[:12])
	}
	runJSON(t, s.bin, lap2, nil, "checkout", "desk", "--server", b.url, "--token", s.tokens["lap2"])
	top2 := filepath.Join(lap2, "desktops", "desk.system.qcow2")
	testutil.QemuCompare(t, filepath.Join(s.dir, "layers", want+".qcow2"), top2)

	// 3. A check-in through A cut by A's death resumes through B.
	want = laptopWriteN(t, lap2, 2, 160<<20)
	ci := cvdProc(s.bin, lap2, "checkin", "desk", "--server", a.url, "--bwlimit", "40M")
	ciOut := &strings.Builder{}
	ci.Stdout, ci.Stderr = ciOut, ciOut
	if err := ci.Start(); err != nil {
		t.Fatal(err)
	}
	ciDone := make(chan error, 1)
	go func() { ciDone <- ci.Wait() }()
	// Past the first checkpoint (64 MiB) and well before the end.
	deadline := time.Now().Add(60 * time.Second)
	for s.stagedBytes() < 96<<20 {
		select {
		case err := <-ciDone:
			t.Fatalf("the check-in through A ended before A was killed: %v\n%s", err, ciOut)
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("A staged %d bytes in 60 s", s.stagedBytes())
		}
		time.Sleep(5 * time.Millisecond)
	}
	staged := s.stagedBytes()
	a.kill()
	if err := <-ciDone; err == nil {
		t.Fatalf("the check-in through a killed server succeeded:\n%s", ciOut)
	}
	if h := s.versions().HeadVersion(); h != nil && h.System == want {
		t.Fatal("the head moved before the check-in was committed")
	}
	rep = laptop.CheckinReport{}
	runJSON(t, s.bin, lap2, &rep, "checkin", "desk", "--server", b.url)
	total := int64(160 << 20 >> 16) // random clusters written (the copied and zero ones dedup)
	t.Logf("A killed after staging %d MiB; the rerun through B resumed %v, sent %d of %d clusters", staged>>20, rep.Resumed, rep.Sent, total)
	if rep.Sent == 0 || rep.Sent > total-(64<<20>>16) {
		t.Errorf("the rerun through B sent %d clusters: want some, and not those A received before its checkpoint (%d of %d)", rep.Sent, 64<<20>>16, total)
	}
	vs := s.versions()
	if h := vs.HeadVersion(); h == nil || h.System != want {
		t.Fatalf("head after the resumed check-in: %+v, want system layer %s", h, want[:12])
	}
	n := 0
	for _, v := range vs.Versions {
		if v.System == want {
			n++
		}
	}
	if n != 1 {
		t.Fatalf("the check-in is in %d versions, want 1", n)
	}
	testutil.QemuCompare(t, filepath.Join(s.dir, "layers", want+".qcow2"), top2)

	// 4. Fencing: lap2's lease is broken and taken by lap1 through B; lap2's
	// check-in through a new server A' is kept as a conflict, not the head.
	a2 := startServe(t, s.bin, s.dir)
	mustCvd(t, s.dir, "device", "break-lease", "desk")
	runJSON(t, s.bin, lap1, nil, "checkout", "desk", "--server", b.url, "--token", s.tokens["lap1"])
	head := s.versions().Head
	stale := laptopWrite(t, lap2, 3)
	rep = laptop.CheckinReport{}
	runJSON(t, s.bin, lap2, &rep, "checkin", "desk", "--server", a2.url)
	vs = s.versions()
	if !rep.Conflict || vs.Head != head {
		t.Fatalf("check-in on a broken lease: conflict %v, head %d (was %d)", rep.Conflict, vs.Head, head)
	}
	if h := vs.HeadVersion(); h.System == stale {
		t.Fatal("a stale lease's check-in became the head")
	}
	a2.stop()
	b.stop()
	mustCvd(t, s.dir, "store", "check")
	checkQcow2Under(t, s.dir)
}
