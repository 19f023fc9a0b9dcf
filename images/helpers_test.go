package images

import (
	"context"
	"encoding/json"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/cvd-project/cvd/catalog"
	"github.com/cvd-project/cvd/internal/testutil"
)

// openStore opens a new store in a temporary directory. When the test ends, the
// store is closed, checked, and every qcow2 file in it passes qemu-img check.
func openStore(t *testing.T) *Store {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "store")
	s, err := Open(dir, OpenOptions{Catalog: testutil.Catalog(t)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		s.Close()
		checkAllImages(t, dir)
	})
	return s
}

// checkAllImages runs qemu-img check on every qcow2 file under dir.
func checkAllImages(t testing.TB, dir string) {
	t.Helper()
	filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err == nil && !d.IsDir() && strings.HasSuffix(p, ".qcow2") {
			testutil.QemuCheck(t, p)
		}
		return nil
	})
}

// mustClean fails the test when the store's check finds a problem.
func mustClean(t *testing.T, s *Store) {
	t.Helper()
	rep, err := s.Check(context.Background(), CheckOptions{Deep: true})
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range rep.Problems {
		t.Errorf("store check: %s", p)
	}
}

func qimg(t testing.TB, args ...string) string {
	t.Helper()
	return testutil.Run(t, "qemu-img", args...)
}

func qio(t testing.TB, path string, cmds ...string) {
	t.Helper()
	args := []string{}
	for _, c := range cmds {
		args = append(args, "-c", c)
	}
	testutil.Run(t, "qemu-io", append(args, path)...)
}

// makeImage creates a qcow2 image with qemu-img (size like "64M"; backing "" for
// none) and runs qemu-io commands on it.
func makeImage(t testing.TB, path, size, backing string, cmds ...string) string {
	t.Helper()
	args := []string{"create", "-q", "-f", "qcow2"}
	if backing != "" {
		args = append(args, "-b", backing, "-F", "qcow2")
	}
	args = append(args, path)
	if size != "" {
		args = append(args, size)
	}
	qimg(t, args...)
	if len(cmds) > 0 {
		qio(t, path, cmds...)
	}
	return path
}

func importT(t *testing.T, s *Store, path string, opts ImportOptions) *Layer {
	t.Helper()
	l, _, err := s.Import(context.Background(), path, opts)
	if err != nil {
		t.Fatalf("import %s: %v", path, err)
	}
	return l
}

func layerFiles(t *testing.T, s *Store) []string {
	t.Helper()
	ents, err := os.ReadDir(s.Path(LayersDir))
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, e := range ents {
		out = append(out, e.Name())
	}
	return out
}

// orphanJournal makes the store's journal entries look as if a process that is
// gone wrote them (recovery leaves a running process's entries alone).
func orphanJournal(t *testing.T, s *Store) {
	t.Helper()
	gone := exec.Command("true")
	if err := gone.Run(); err != nil {
		t.Fatal(err)
	}
	err := s.db.Update(func(tx *catalog.Tx) error {
		b := tx.Bucket(bucketPending)
		type kv struct{ k, v []byte }
		var all []kv
		b.ForEach(func(k, v []byte) error { all = append(all, kv{k, v}); return nil })
		for _, e := range all {
			var pe pendingEntry
			if err := json.Unmarshal(e.v, &pe); err != nil {
				return err
			}
			pe.PID = gone.Process.Pid
			if err := putJSON(b, string(e.k), pe); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}
