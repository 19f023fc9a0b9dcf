package clone

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/cvd-project/cvd/internal/testutil"
)

func TestSeedISO(t *testing.T) {
	testutil.NeedTool(t, "iso", "isoinfo")
	dir := t.TempDir()
	tests := []struct {
		name string
		id   Identity
	}{
		{"plain", Identity{UUID: "6f1c2f3e-8a7b-4c1d-9e2f-0a1b2c3d4e5f", MAC: "02:00:00:00:00:01", Hostname: "web-0001"}},
		{"long-hostname", Identity{UUID: "00000000-0000-4000-8000-000000000000", MAC: "02:ff:ff:ff:ff:ff", Hostname: strings.Repeat("h", 63)}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p := filepath.Join(dir, tt.name+".iso")
			if err := WriteSeed(p, dir, tt.id); err != nil {
				t.Fatal(err)
			}
			meta, user := SeedFiles(tt.id)
			d := testutil.Run(t, "isoinfo", "-d", "-i", p)
			if !strings.Contains(d, "Volume id: "+SeedLabel+"\n") {
				t.Errorf("volume label: isoinfo -d says\n%s", d)
			}
			if !strings.Contains(d, "Rock Ridge signatures version 1 found") {
				t.Errorf("no Rock Ridge: isoinfo -d says\n%s", d)
			}
			// Rock Ridge names, the ones cloud-init sees when it mounts the image.
			ls := testutil.Run(t, "isoinfo", "-R", "-f", "-i", p)
			for _, n := range []string{"/meta-data", "/user-data"} {
				if !strings.Contains(ls, n+"\n") {
					t.Errorf("isoinfo -R -f lists no %s:\n%s", n, ls)
				}
			}
			if got := testutil.Run(t, "isoinfo", "-R", "-i", p, "-x", "/meta-data"); got != string(meta) {
				t.Errorf("meta-data = %q, want %q", got, meta)
			}
			if got := testutil.Run(t, "isoinfo", "-R", "-i", p, "-x", "/user-data"); got != string(user) {
				t.Errorf("user-data = %q, want %q", got, user)
			}
			// Joliet names too.
			if got := testutil.Run(t, "isoinfo", "-J", "-i", p, "-x", "/meta-data"); got != string(meta) {
				t.Errorf("Joliet meta-data = %q, want %q", got, meta)
			}
			if !strings.Contains(string(meta), "instance-id: "+tt.id.UUID+"\n") || !strings.Contains(string(meta), "local-hostname: "+tt.id.Hostname+"\n") {
				t.Errorf("meta-data %q lacks the identity", meta)
			}
			if !strings.HasPrefix(string(user), "#cloud-config\n") || !strings.Contains(string(user), "hostname: "+tt.id.Hostname+"\n") {
				t.Errorf("user-data %q", user)
			}
			fi, err := os.Stat(p)
			if err != nil {
				t.Fatal(err)
			}
			if fi.Size()%2048 != 0 || !strings.Contains(d, fmt.Sprintf("Volume size is: %d\n", fi.Size()/2048)) {
				t.Errorf("file size %d does not match the volume size:\n%s", fi.Size(), d)
			}
			ents, _ := os.ReadDir(dir)
			for _, e := range ents {
				if strings.HasPrefix(e.Name(), ".tmp-") {
					t.Errorf("work directory left behind: %s", e.Name())
				}
			}
		})
	}
}

func TestWriteSeedRefusesExisting(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "x.iso")
	os.WriteFile(p, []byte("keep"), 0o644)
	if err := WriteSeed(p, dir, Identity{UUID: "u", Hostname: "h"}); err == nil {
		t.Fatal("WriteSeed over an existing file succeeded")
	}
	if b, _ := os.ReadFile(p); string(b) != "keep" {
		t.Fatalf("existing file changed: %q", b)
	}
}

func TestHostname(t *testing.T) {
	tests := []struct{ name, in, want string }{
		{"simple", "web-01", "web-01"},
		{"upper and underscore", "Web_01", "web-01"},
		{"trim dashes", "_x_", "x"},
		{"too long", strings.Repeat("a", 70), strings.Repeat("a", 63)},
		{"empty after trim", "__", "clone"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := Hostname(tt.in); got != tt.want {
				t.Errorf("Hostname(%q) = %q, want %q", tt.in, got, tt.want)
			}
		})
	}
}

func TestNewIdentities(t *testing.T) {
	names := Names("vm", 5000, 1)
	used := map[string]bool{}
	ids, err := NewIdentities(names, used)
	if err != nil {
		t.Fatal(err)
	}
	macs, uuids := map[string]bool{}, map[string]bool{}
	for i, id := range ids {
		if macs[id.MAC] || uuids[id.UUID] {
			t.Fatalf("duplicate identity %+v", id)
		}
		macs[id.MAC], uuids[id.UUID] = true, true
		if !strings.HasPrefix(id.MAC, "02:") || len(id.MAC) != 17 {
			t.Fatalf("MAC %q is not 02:xx:xx:xx:xx:xx", id.MAC)
		}
		if id.Hostname != names[i] {
			t.Fatalf("hostname %q for %q", id.Hostname, names[i])
		}
	}
}

func TestNames(t *testing.T) {
	tests := []struct {
		name         string
		prefix       string
		count, start int
		want         []string
	}{
		{"one", "a", 1, 0, []string{"a"}},
		{"three", "a", 3, 0, []string{"a-1", "a-2", "a-3"}},
		{"padded", "a", 10, 1, []string{"a-01", "a-02", "a-03", "a-04", "a-05", "a-06", "a-07", "a-08", "a-09", "a-10"}},
		{"start", "a", 2, 99, []string{"a-099", "a-100"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := Names(tt.prefix, tt.count, tt.start)
			if strings.Join(got, ",") != strings.Join(tt.want, ",") {
				t.Errorf("Names = %v, want %v", got, tt.want)
			}
		})
	}
}

func TestSeedWorkDirSweep(t *testing.T) {
	dir := t.TempDir()
	old := shmDir
	shmDir = dir
	defer func() { shmDir = old }()
	dead := filepath.Join(dir, "cvd-seed-999999999-abc")
	mine := filepath.Join(dir, fmt.Sprintf("cvd-seed-%d-abc", os.Getpid()))
	other := filepath.Join(dir, "unrelated")
	for _, d := range []string{dead, mine, other} {
		os.MkdirAll(filepath.Join(d, "x"), 0o755)
	}
	w, cleanup, err := seedWorkDir("", "/nonexistent")
	if err != nil {
		t.Fatal(err)
	}
	if filepath.Dir(w) != dir {
		t.Errorf("work dir %s not in %s", w, dir)
	}
	if err := WriteSeed(filepath.Join(t.TempDir(), "s.iso"), w, Identity{UUID: "u", Hostname: "h"}); err != nil {
		t.Fatal(err)
	}
	cleanup()
	if _, err := os.Stat(w); !os.IsNotExist(err) {
		t.Errorf("work dir left: %v", err)
	}
	if _, err := os.Stat(dead); !os.IsNotExist(err) {
		t.Errorf("a dead process's work dir survived: %v", err)
	}
	for _, d := range []string{mine, other} {
		if _, err := os.Stat(d); err != nil {
			t.Errorf("%s removed: %v", d, err)
		}
	}
	// A chosen work dir is used as it is.
	if w, _, _ := seedWorkDir("/somewhere", "/x"); w != "/somewhere" {
		t.Errorf("chosen work dir: %s", w)
	}
}
