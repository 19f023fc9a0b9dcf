package files_test

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/cvd-project/cvd/disk"
	"github.com/cvd-project/cvd/files"
)

// FuzzManifest reads arbitrary disks as file systems (their files, the files
// in given blocks, and where their metadata lies): nothing may panic or hang,
// and ranges and byte counts stay inside the disk.
func FuzzManifest(f *testing.F) {
	dir := f.TempDir()
	src := filepath.Join(dir, "tree")
	os.MkdirAll(filepath.Join(src, "etc"), 0o755)
	os.WriteFile(filepath.Join(src, "etc", "hostname"), []byte("fuzz\n"), 0o644)
	seed := filepath.Join(dir, "seed.raw")
	os.WriteFile(seed, nil, 0o644)
	os.Truncate(seed, 256<<10)
	if out, err := exec.Command("mkfs.ext4", "-q", "-F", "-d", src, seed).CombinedOutput(); err == nil {
		if b, err := os.ReadFile(seed); err == nil {
			f.Add(b)
		}
	} else {
		f.Logf("mkfs.ext4: %v %s", err, out)
	}
	f.Add(make([]byte, 4096))
	in := dir
	if d, err := os.MkdirTemp("/dev/shm", "cvd-fuzz-"); err == nil {
		in = d
		f.Cleanup(func() { os.RemoveAll(d) })
	}
	p := filepath.Join(in, "input.raw")
	f.Fuzz(func(t *testing.T, data []byte) {
		if err := os.WriteFile(p, data, 0o644); err != nil {
			t.Fatal(err)
		}
		img, err := disk.Open(p, disk.OpenOptions{ReadOnly: true, Format: disk.FormatRaw})
		if err != nil {
			return
		}
		defer img.Close()
		files.Manifest(context.Background(), img)
		hits, err := files.FilesIn(context.Background(), img, []files.Range{{Off: 0, Len: img.Size()}})
		for _, h := range hits {
			if h.Bytes <= 0 || h.Bytes > img.Size() {
				t.Fatalf("file hit %+v on a %d-byte disk", h, img.Size())
			}
		}
		rs, err := files.Metadata(context.Background(), img)
		if err == nil {
			for _, r := range rs {
				if r.Off < 0 || r.Len <= 0 {
					t.Fatalf("metadata range %+v", r)
				}
			}
		}
	})
}

// FuzzParseRules reads arbitrary rule lists: nothing panics, a list that
// parses holds only user and system rules with absolute patterns, and a path
// is classified by it.
func FuzzParseRules(f *testing.F) {
	f.Add([]byte("user /home/**\nuser /root/**\nsystem /**\n"), "/home/u/a.txt")
	f.Add([]byte("# comment\n\nsystem /etc/*.conf\nuser /etc/hostname\n"), "/etc/hostname")
	f.Add([]byte("user /[a-\n"), "/x")
	f.Add([]byte("admin /x\n"), "/x")
	f.Fuzz(func(t *testing.T, b []byte, p string) {
		rules, err := files.ParseRules(bytes.NewReader(b))
		if err != nil {
			return
		}
		for _, r := range rules {
			if (r.Class != files.ClassUser && r.Class != files.ClassSystem) || !strings.HasPrefix(r.Pattern, "/") {
				t.Fatalf("rule %+v parsed", r)
			}
		}
		class, _ := files.Classify(rules, p)
		if class != files.ClassUser && class != files.ClassSystem {
			t.Fatalf("class %q", class)
		}
	})
}
