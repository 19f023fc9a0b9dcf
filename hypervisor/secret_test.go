package hypervisor

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"regexp"
	"testing"
	"time"

	"github.com/digitalocean/go-libvirt"
	"github.com/google/uuid"

	"github.com/cvd-project/cvd/disk"
	"github.com/cvd-project/cvd/internal/testutil"
)

// The tiny guest boots under libvirt from a chain whose every layer is LUKS
// encrypted, each with its own key given as an ephemeral libvirt secret, and
// writes its pattern into the encrypted top; the secrets go with the domain.
func TestGuestEncryptedChain(t *testing.T) {
	c := needGuest(t)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	plainBase := makeBase(t)
	dir := t.TempDir()
	base := filepath.Join(dir, "base.qcow2")
	top := filepath.Join(dir, "top.qcow2")
	kBase, kTop := []byte("base-key-0123456789abcdef"), []byte("top-key-fedcba9876543210")
	src, err := disk.Open(plainBase, disk.OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	if err := disk.Convert(ctx, src, base, disk.ConvertOptions{Encrypt: &disk.Encryption{Key: kBase}}); err != nil {
		t.Fatal(err)
	}
	src.Close()
	img, err := disk.Create(top, disk.CreateOptions{BackingFile: base, BackingFormat: disk.FormatQcow2,
		Encrypt: &disk.Encryption{Key: kTop}, Keys: disk.KeyMap(map[string][]byte{base: kBase})})
	if err != nil {
		t.Fatal(err)
	}
	img.Close()

	g := newGuest(t, c, base, "secret", "cvd.pattern=0x6b")
	os.Remove(g.top) // newGuest's plain top: this guest writes the encrypted one
	g.top = top
	g.spec.Disks[0].Chain[0].Path = top
	g.spec.Disks[0].Keys = [][]byte{kTop, kBase}
	x, err := g.spec.XML()
	if err != nil {
		t.Fatal(err)
	}
	if n := bytes.Count([]byte(x), []byte(`<encryption format="luks">`)); n != 2 {
		t.Fatalf("%d <encryption> elements in the domain XML, want 2:\n%s", n, x)
	}
	if err := c.Define(ctx, g.spec); err != nil {
		t.Fatal(err)
	}
	if err := c.Start(ctx, g.name); err != nil {
		t.Fatal(err)
	}
	waitLog(ctx, t, g.log, regexp.MustCompile(`cvd-guest: init started`))
	if s, err := c.Wait(ctx, g.name); err != nil || s.Reason != "shutdown" {
		t.Fatalf("guest: %v %v\n%s", s, err, readLog(t, g.log))
	}
	testutil.QemuCheckLUKS(t, top, string(kTop), string(kBase))

	// The top holds the pattern and the hostname, readable with its key only.
	ro, err := disk.Open(top, disk.OpenOptions{ReadOnly: true, Keys: disk.KeyMap(map[string][]byte{top: kTop, base: kBase})})
	if err != nil {
		t.Fatal(err)
	}
	got := make([]byte, patternLen)
	if _, err := ro.ReadAt(got, patternOff); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, bytes.Repeat([]byte{0x6b}, patternLen)) {
		t.Fatalf("the guest's pattern block reads %x...", got[:16])
	}
	host := make([]byte, len("secret"))
	ro.ReadAt(host, hostOff)
	if string(host) != "secret" {
		t.Fatalf("hostname %q", host)
	}
	base0 := make([]byte, 4096)
	ro.ReadAt(base0, 0)
	if base0[0] != baseData {
		t.Fatalf("the base's data reads %#x through the encrypted chain", base0[0])
	}
	ro.Close()
	raw, err := os.ReadFile(top)
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Contains(raw, bytes.Repeat([]byte{0x6b}, 512)) {
		t.Fatal("the guest's plaintext is in the top file")
	}

	// The secrets are ephemeral and private, and go with the domain.
	id := uuid.MustParse(SecretUUID(top))
	s, err := c.l.SecretLookupByUUID(libvirt.UUID(id))
	if err != nil {
		t.Fatalf("secret of the top: %v", err)
	}
	if _, err := c.l.SecretGetValue(s, 0); err == nil {
		t.Error("the secret's value can be read back: it is not private")
	}
	sx, err := c.l.SecretGetXMLDesc(s, 0)
	if err != nil || !bytes.Contains([]byte(sx), []byte(`ephemeral="yes"`)) && !bytes.Contains([]byte(sx), []byte(`ephemeral='yes'`)) {
		t.Errorf("secret XML: %v\n%s", err, sx)
	}
	if err := c.Undefine(ctx, g.name, 0); err != nil {
		t.Fatal(err)
	}
	if _, err := c.l.SecretLookupByUUID(libvirt.UUID(id)); err == nil {
		t.Error("the top's secret outlived the domain")
	}
}
