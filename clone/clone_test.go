package clone

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/cvd-project/cvd/images"
	"github.com/cvd-project/cvd/internal/testutil"
)

type fixture struct {
	st        *images.Store
	base, app *images.Layer
}

// newFixture makes a store with a base of baseSize bytes whose first dataSize
// bytes hold data, an app layer on it, and the desktop "desk" (base + app, and a
// blank user disk when user is set). qemu-img check runs on every image when the
// test ends.
func newFixture(t testing.TB, baseSize, dataSize string, user bool) *fixture {
	t.Helper()
	testutil.NeedQemu(t)
	tmp := t.TempDir()
	dir := filepath.Join(tmp, "store")
	st, err := images.Open(dir, images.OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	bp := filepath.Join(tmp, "base.qcow2")
	testutil.Run(t, "qemu-img", "create", "-q", "-f", "qcow2", bp, baseSize)
	testutil.Run(t, "qemu-io", "-c", "write -P 0x5a 0 "+dataSize, bp)
	ctx := context.Background()
	f := &fixture{st: st}
	if f.base, _, err = st.Import(ctx, bp, images.ImportOptions{Names: []string{"os:1"}}); err != nil {
		t.Fatal(err)
	}
	os.Remove(bp)
	ap := filepath.Join(tmp, "app.qcow2")
	testutil.Run(t, "qemu-img", "create", "-q", "-f", "qcow2", "-b", st.LayerPath(f.base.ID), "-F", "qcow2", ap)
	testutil.Run(t, "qemu-io", "-c", "write -P 0xa5 1M 1M", ap)
	if f.app, _, err = st.Import(ctx, ap, images.ImportOptions{Names: []string{"app:1"}}); err != nil {
		t.Fatal(err)
	}
	spec := images.DesktopSpec{Base: "os:1", Apps: []string{"app:1"}}
	if user {
		spec.UserSize = 16 << 20
	}
	if _, err := st.CreateDesktop(ctx, "desk", spec); err != nil {
		t.Fatal(err)
	}
	return f
}

func checkImages(t testing.TB, paths []string) {
	t.Helper()
	ch := make(chan string)
	var wg sync.WaitGroup
	var mu sync.Mutex
	var failed []string
	for w := 0; w < 4; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for p := range ch {
				out, err := testutil.RunErr("qemu-img", "check", "-q", p)
				if err != nil {
					mu.Lock()
					failed = append(failed, p+": "+err.Error()+" "+out)
					mu.Unlock()
				}
			}
		}()
	}
	for _, p := range paths {
		ch <- p
	}
	close(ch)
	wg.Wait()
	for _, f := range failed {
		t.Errorf("qemu-img check %s", f)
	}
}

func mustClean(t testing.TB, st *images.Store) {
	t.Helper()
	rep, err := st.Check(context.Background(), images.CheckOptions{})
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range rep.Problems {
		t.Errorf("store check: %s", p)
	}
}

func fileSum(t testing.TB, p string) string {
	t.Helper()
	f, err := os.Open(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	h := sha256.New()
	io.Copy(h, f)
	return fmt.Sprintf("%x", h.Sum(nil))
}

func TestCreateClones(t *testing.T) {
	testutil.NeedTool(t, "iso", "isoinfo")
	f := newFixture(t, "64M", "8M", true)
	ctx := context.Background()
	tests := []struct {
		name   string
		source string
		opts   Options
		layer  string
		user   bool
	}{
		{"one of a desktop", "desk", Options{Name: "solo"}, f.app.ID, true},
		{"five of a desktop", "desk", Options{Name: "web", Count: 5, Boot: &images.Boot{Kernel: "/k", Cmdline: "x=1", MemoryMiB: 64}}, f.app.ID, true},
		{"of a layer, no seed", "os:1", Options{Name: "raw", Count: 3, NoSeed: true, FsyncEach: true}, f.base.ID, false},
	}
	layerSums := map[string]string{}
	for _, id := range []string{f.base.ID, f.app.ID} {
		layerSums[id] = fileSum(t, f.st.LayerPath(id))
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cs, err := Create(ctx, f.st, tt.source, tt.opts)
			if err != nil {
				t.Fatal(err)
			}
			if len(cs) != max(1, tt.opts.Count) {
				t.Fatalf("%d clones", len(cs))
			}
			var paths []string
			for i, c := range cs {
				if c.Layer != tt.layer || (c.UserDisk != "") != tt.user || (c.Seed != "") == tt.opts.NoSeed {
					t.Errorf("clone record %+v", c)
				}
				if rec, err := f.st.Clone(c.Name); err != nil {
					t.Error(err)
				} else if (rec.Boot == nil) != (tt.opts.Boot == nil) || (rec.Boot != nil && *rec.Boot != *tt.opts.Boot) {
					t.Errorf("clone %s: boot recorded %+v, want %+v", c.Name, rec.Boot, tt.opts.Boot)
				}
				p := f.st.Path(c.Disk)
				paths = append(paths, p)
				if c.UserDisk != "" {
					paths = append(paths, f.st.Path(c.UserDisk))
				}
				if i == 0 || i == len(cs)-1 {
					chain := testutil.Run(t, "qemu-img", "info", "--backing-chain", p)
					wantLayers := 3
					if tt.layer == f.base.ID {
						wantLayers = 2
					}
					if n := strings.Count(chain, "\nfile format: qcow2"); n != wantLayers {
						t.Errorf("chain of %s has %d qcow2 images, want %d:\n%s", c.Name, n, wantLayers, chain)
					}
					if !strings.Contains(chain, "backing file: ../layers/"+tt.layer+".qcow2") || !strings.Contains(chain, "\nbacking file format: qcow2") {
						t.Errorf("backing of %s:\n%s", c.Name, chain)
					}
					if !testutil.QemuCompare(t, p, f.st.LayerPath(tt.layer)) {
						t.Errorf("clone %s reads differently from its chain", c.Name)
					}
				}
				if c.Seed != "" {
					checkSeed(t, f.st.Path(c.Seed), c)
				}
			}
			checkImages(t, paths)
		})
	}
	all, _ := f.st.Clones()
	macs := map[string]bool{}
	for _, c := range all {
		if macs[c.MAC] {
			t.Errorf("duplicate MAC %s", c.MAC)
		}
		macs[c.MAC] = true
	}
	// Name conflicts: nothing is made.
	if _, err := Create(ctx, f.st, "desk", Options{Name: "web", Count: 6}); !errors.Is(err, images.ErrExists) {
		t.Errorf("clones over existing names: %v", err)
	}
	if _, err := Create(ctx, f.st, "nothing", Options{Name: "x"}); !errors.Is(err, images.ErrNotFound) {
		t.Errorf("clone of nothing: %v", err)
	}
	if n, _ := f.st.Clones(); len(n) != len(all) {
		t.Errorf("failed creates recorded clones")
	}
	// Removing clones never touches a layer.
	var names []string
	for _, c := range all {
		names = append(names, c.Name)
	}
	if _, err := Remove(f.st, names...); err != nil {
		t.Fatal(err)
	}
	for id, sum := range layerSums {
		if fileSum(t, f.st.LayerPath(id)) != sum {
			t.Errorf("layer %s changed", images.ShortID(id))
		}
	}
	if ents, _ := os.ReadDir(f.st.Path(images.ClonesDir)); len(ents) != 0 {
		t.Errorf("clone rm left %d files", len(ents))
	}
	mustClean(t, f.st)
}

func checkSeed(t testing.TB, iso string, c images.Clone) {
	t.Helper()
	d := testutil.Run(t, "isoinfo", "-d", "-i", iso)
	if !strings.Contains(d, "Volume id: cidata\n") {
		t.Errorf("%s: volume id:\n%s", iso, d)
	}
	meta := testutil.Run(t, "isoinfo", "-R", "-i", iso, "-x", "/meta-data")
	if meta != fmt.Sprintf("instance-id: %s\nlocal-hostname: %s\n", c.UUID, c.Hostname) {
		t.Errorf("%s meta-data %q", iso, meta)
	}
	user := testutil.Run(t, "isoinfo", "-R", "-i", iso, "-x", "/user-data")
	if !strings.HasPrefix(user, "#cloud-config\n") || !strings.Contains(user, "\nhostname: "+c.Hostname+"\n") {
		t.Errorf("%s user-data %q", iso, user)
	}
}

// duBytes is the space the files under dir take on disk.
func duBytes(t testing.TB, dir string) int64 {
	t.Helper()
	var n int64
	filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return nil
		}
		fi, err := d.Info()
		if err == nil {
			if st, ok := fi.Sys().(*syscall.Stat_t); ok {
				n += st.Blocks * 512
			}
		}
		return nil
	})
	return n
}

// TestThousandClones: 1,000 clones of a desktop whose base holds 1 GiB of data.
// The base is never copied: the store grows by a few KiB per clone, seed included.
func TestThousandClones(t *testing.T) {
	testutil.NeedTool(t, "iso", "isoinfo")
	count, data := 1000, "1G"
	if testing.Short() {
		count, data = 100, "64M"
	}
	start := time.Now()
	f := newFixture(t, "2G", data, false)
	t.Logf("fixture (import of a base holding %s) in %v", data, time.Since(start).Round(time.Millisecond))
	if testing.Short() == false && f.base.DataBytes < 1<<30 {
		t.Fatalf("base holds %d bytes of data", f.base.DataBytes)
	}
	before := duBytes(t, f.st.Dir())
	start = time.Now()
	cs, err := Create(context.Background(), f.st, "desk", Options{Name: "vm", Count: count})
	if err != nil {
		t.Fatal(err)
	}
	el := time.Since(start)
	grown := duBytes(t, f.st.Dir()) - before
	per := grown / int64(count)
	t.Logf("%d clones with seeds in %v (%.0f clones/s); store grew %d bytes, %d per clone",
		count, el.Round(time.Millisecond), float64(count)/el.Seconds(), grown, per)
	if per >= 256<<10 {
		t.Errorf("store grew %d bytes per clone, want well under 1 MiB", per)
	}
	var paths []string
	for _, c := range cs {
		paths = append(paths, f.st.Path(c.Disk))
	}
	checkImages(t, paths)
	for _, i := range []int{0, count / 2, count - 1} {
		c := cs[i]
		chain := testutil.Run(t, "qemu-img", "info", "--backing-chain", f.st.Path(c.Disk))
		if n := strings.Count(chain, "\nfile format: qcow2"); n != 3 || strings.Count(chain, "\nbacking file format: qcow2") != 2 {
			t.Errorf("chain of %s:\n%s", c.Name, chain)
		}
		checkSeed(t, f.st.Path(c.Seed), c)
	}
	// Every seed carries its own clone's identity.
	parallel(cs, func(c images.Clone) error {
		meta, err := testutil.RunErr("isoinfo", "-R", "-i", f.st.Path(c.Seed), "-x", "/meta-data")
		if want := fmt.Sprintf("instance-id: %s\nlocal-hostname: %s\n", c.UUID, c.Hostname); err != nil || meta != want {
			return fmt.Errorf("seed of %s: meta-data %q, %v", c.Name, meta, err)
		}
		return nil
	}, t)
	if !testutil.QemuCompare(t, f.st.Path(cs[count-1].Disk), f.st.LayerPath(f.app.ID)) {
		t.Error("a clone reads differently from its chain")
	}
	uuids, macs := map[string]bool{}, map[string]bool{}
	for _, c := range cs {
		if uuids[c.UUID] || macs[c.MAC] {
			t.Fatalf("identity repeated: %+v", c)
		}
		uuids[c.UUID], macs[c.MAC] = true, true
	}
	mustClean(t, f.st)
}

// benchClones measures Create in batches of 100 clones.
func benchClones(b *testing.B, noSeed bool) {
	f := newFixture(b, "1G", "64M", false)
	const batch = 100
	n := 0
	start := time.Now()
	for b.Loop() {
		_, err := Create(context.Background(), f.st, "desk", Options{Name: fmt.Sprintf("b%d", n), Count: batch, NoSeed: noSeed})
		if err != nil {
			b.Fatal(err)
		}
		n++
	}
	b.ReportMetric(float64(n*batch)/time.Since(start).Seconds(), "clones/s")
}

func BenchmarkCreateDisk(b *testing.B)     { benchClones(b, true) }
func BenchmarkCreateWithSeed(b *testing.B) { benchClones(b, false) }

// TestConcurrentCreate: two Creates of the same names in one process; one wins,
// the other fails without removing the winner's files.
func TestConcurrentCreate(t *testing.T) {
	f := newFixture(t, "64M", "1M", false)
	errs := make(chan error, 2)
	for i := 0; i < 2; i++ {
		go func() {
			_, err := Create(context.Background(), f.st, "desk", Options{Name: "same", Count: 200})
			errs <- err
		}()
	}
	e1, e2 := <-errs, <-errs
	if (e1 == nil) == (e2 == nil) {
		t.Fatalf("both or neither succeeded: %v, %v", e1, e2)
	}
	for _, e := range []error{e1, e2} {
		if e != nil && !errors.Is(e, images.ErrExists) && !errors.Is(e, os.ErrExist) {
			t.Errorf("loser: %v", e)
		}
	}
	cs, _ := f.st.Clones()
	if len(cs) != 200 {
		t.Fatalf("%d clones", len(cs))
	}
	mustClean(t, f.st)
}

// parallel runs fn on every clone with 4 workers and reports errors.
func parallel(cs []images.Clone, fn func(images.Clone) error, t testing.TB) {
	t.Helper()
	ch := make(chan images.Clone)
	errs := make(chan error, len(cs))
	var wg sync.WaitGroup
	for w := 0; w < 4; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for c := range ch {
				if err := fn(c); err != nil {
					errs <- err
				}
			}
		}()
	}
	for _, c := range cs {
		ch <- c
	}
	close(ch)
	wg.Wait()
	close(errs)
	n := 0
	for err := range errs {
		if n++; n <= 10 {
			t.Error(err)
		}
	}
}
