package syncd

import (
	"context"
	"io/fs"
	"log/slog"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/cvd-project/cvd/disk"
	"github.com/cvd-project/cvd/images"
	"github.com/cvd-project/cvd/internal/testutil"
	"github.com/cvd-project/cvd/syncd/laptop"
	"github.com/cvd-project/cvd/syncd/proto"
)

const (
	KiB = int64(1) << 10
	MiB = int64(1) << 20
	GiB = int64(1) << 30
)

// write is one range written into an image: data, or zeros when zero is set.
type write struct {
	off  int64
	data []byte
	zero int64
}

// makeImage writes an image at path (on backing, when given) with ws.
func makeImage(t testing.TB, path string, size int64, backing string, ws []write) {
	t.Helper()
	co := disk.CreateOptions{Size: size, AllowedRoots: []string{filepath.Dir(filepath.Dir(path)), filepath.Dir(path)}}
	if backing != "" {
		co.BackingFile, co.BackingFormat, co.Size = backing, disk.FormatQcow2, 0
		co.AllowedRoots = append(co.AllowedRoots, filepath.Dir(backing))
	}
	img, err := disk.Create(path, co)
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	applyWrites(t, img, ws)
}

func applyWrites(t testing.TB, img disk.Image, ws []write) {
	t.Helper()
	for _, w := range ws {
		var err error
		if w.zero > 0 {
			err = img.WriteZeroes(w.off, w.zero)
		} else {
			_, err = img.WriteAt(w.data, w.off)
		}
		if err != nil {
			t.Fatal(err)
		}
	}
	if err := img.Flush(); err != nil {
		t.Fatal(err)
	}
}

// world is a server store with a desktop, served on loopback, and a device.
type world struct {
	t        testing.TB
	dir      string
	store    *images.Store
	srv      *Server
	http     *httptest.Server
	token    string
	device   *Device
	desktop  string
	base     string // layer IDs
	app      string
	baseSize int64
	now      time.Time
}

type worldSpec struct {
	baseSize   int64
	baseWrites []write
	appWrites  []write
	userSize   int64
	// Server-side changes made before the first check-out (sealed by it as a
	// version): on the system and user tops.
	sysWrites, userWrites []write
}

func newWorld(t testing.TB, spec worldSpec) *world {
	t.Helper()
	return newWorldAt(t, filepath.Join(t.TempDir(), "server"), spec)
}

func newWorldAt(t testing.TB, dir string, spec worldSpec) *world {
	t.Helper()
	testutil.NeedQemu(t)
	w := &world{t: t, dir: dir, desktop: "desk", baseSize: spec.baseSize, now: time.Now()}
	src := t.TempDir()
	makeImage(t, filepath.Join(src, "base.qcow2"), spec.baseSize, "", spec.baseWrites)
	makeImage(t, filepath.Join(src, "app.qcow2"), 0, filepath.Join(src, "base.qcow2"), spec.appWrites)
	st, err := images.Open(w.dir, images.OpenOptions{Catalog: testutil.Catalog(t)})
	if err != nil {
		t.Fatal(err)
	}
	w.store = st
	ctx := context.Background()
	bl, _, err := st.Import(ctx, filepath.Join(src, "base.qcow2"), images.ImportOptions{Names: []string{"base:1"}})
	if err != nil {
		t.Fatal(err)
	}
	al, _, err := st.Import(ctx, filepath.Join(src, "app.qcow2"), images.ImportOptions{Parent: bl.ID, Names: []string{"app:1"}})
	if err != nil {
		t.Fatal(err)
	}
	w.base, w.app = bl.ID, al.ID
	d, err := st.CreateDesktop(ctx, w.desktop, images.DesktopSpec{Base: bl.ID, Apps: []string{al.ID}, UserSize: spec.userSize})
	if err != nil {
		t.Fatal(err)
	}
	if len(spec.sysWrites) > 0 {
		w.writeTop(d.SystemDisk, spec.sysWrites)
	}
	if len(spec.userWrites) > 0 {
		w.writeTop(d.UserDisk, spec.userWrites)
	}
	w.start()
	w.device, w.token, err = w.srv.AddDevice("laptop1", DeviceOptions{Desktops: []string{w.desktop}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		w.stop()
		st.Close()
		checkAllImages(t, w.dir)
	})
	return w
}

func (w *world) writeTop(rel string, ws []write) {
	w.t.Helper()
	img, err := disk.Open(w.store.Path(rel), disk.OpenOptions{AllowedRoots: []string{w.dir}})
	if err != nil {
		w.t.Fatal(err)
	}
	defer img.Close()
	applyWrites(w.t, img, ws)
}

func (w *world) start() {
	w.t.Helper()
	srv, err := NewServer(w.store, ServerOptions{Now: func() time.Time { return w.now }, Logger: testLogger()})
	if err != nil {
		w.t.Fatal(err)
	}
	w.srv = srv
	w.http = httptest.NewServer(srv.Handler())
}

func (w *world) stop() {
	if w.http != nil {
		w.http.Close()
		w.http = nil
	}
	if w.srv != nil {
		w.srv.Close()
		w.srv = nil
	}
}

func (w *world) client(token string) *laptop.Client {
	w.t.Helper()
	c, err := laptop.NewClient(w.http.URL, token, laptop.ClientOptions{})
	if err != nil {
		w.t.Fatal(err)
	}
	return c
}

func (w *world) head() (int, *proto.Version) {
	w.t.Helper()
	st, err := w.srv.DesktopStatus(w.desktop)
	if err != nil {
		w.t.Fatal(err)
	}
	for i := range st.Versions {
		if st.Versions[i].N == st.Head {
			return st.Head, &st.Versions[i]
		}
	}
	w.t.Fatalf("head %d missing", st.Head)
	return 0, nil
}

// testLaptop is a local store with its laptop side open.
type testLaptop struct {
	t     testing.TB
	dir   string
	store *images.Store
	lp    *laptop.Laptop
}

func newLaptop(t testing.TB, name string) *testLaptop {
	t.Helper()
	dir := filepath.Join(t.TempDir(), name)
	return openLaptopAt(t, dir)
}

func openLaptopAt(t testing.TB, dir string) *testLaptop {
	t.Helper()
	st, err := images.Open(dir, images.OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	lp, err := laptop.OpenLaptop(st, laptop.LaptopOptions{Logger: testLogger()})
	if err != nil {
		st.Close()
		t.Fatal(err)
	}
	l := &testLaptop{t: t, dir: dir, store: st, lp: lp}
	t.Cleanup(func() { l.close() })
	return l
}

// reopen opens the laptop side again on the same store, with opts (and the
// test logger).
func (l *testLaptop) reopen(opts laptop.LaptopOptions) {
	l.t.Helper()
	l.lp.Close()
	opts.Logger = testLogger()
	lp, err := laptop.OpenLaptop(l.store, opts)
	if err != nil {
		l.t.Fatal(err)
	}
	l.lp = lp
}

func (l *testLaptop) close() {
	if l.lp != nil {
		l.lp.Close()
		l.store.Close()
		checkAllImages(l.t, l.dir)
		l.lp = nil
	}
}

// top returns the absolute path of a disk's top on the laptop.
func (l *testLaptop) top(desktop, diskName string) string {
	l.t.Helper()
	d, err := l.store.Desktop(desktop)
	if err != nil {
		l.t.Fatal(err)
	}
	if diskName == proto.DiskUser {
		return l.store.Path(d.UserDisk)
	}
	return l.store.Path(d.SystemDisk)
}

// checkAllImages runs qemu-img check on every qcow2 file under dir.
func checkAllImages(t testing.TB, dir string) {
	t.Helper()
	filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err == nil && !d.IsDir() && strings.HasSuffix(p, ".qcow2") && !strings.Contains(filepath.Base(p), images.TempPrefix) {
			if encrypted(t, p) {
				// qemu-img check needs the key; the tests of encrypted
				// copies run it with their keys. cvd's check needs none.
				if r, err := disk.Check(p, false); err != nil || r.Corruptions+r.Leaks+r.CheckErrors != 0 {
					t.Errorf("check %s: %+v %v", p, r, err)
				}
				return nil
			}
			testutil.QemuCheck(t, p)
		}
		return nil
	})
}

// encrypted reports whether the qcow2 file at p is LUKS-encrypted.
func encrypted(t testing.TB, p string) bool {
	img, err := disk.Open(p, disk.OpenOptions{ReadOnly: true, NoBacking: true, Keys: disk.Keys()})
	if err != nil {
		t.Errorf("open %s: %v", p, err)
		return false
	}
	defer img.Close()
	return img.Info().Encrypted
}

// qemuCompare fails unless the two chains read the same through qemu-img.
func qemuCompare(t testing.TB, a, b string) {
	t.Helper()
	out, err := testutil.RunErr("qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", a, b)
	if err != nil {
		t.Fatalf("qemu-img compare %s %s: %v\n%s", a, b, err, out)
	}
}

func exists(p string) bool { _, err := os.Stat(p); return err == nil }

func testLogger() *slog.Logger {
	if os.Getenv("CVD_TEST_LOG") == "" {
		return nil
	}
	return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
}
