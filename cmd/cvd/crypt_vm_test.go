package main

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/cvd-project/cvd/internal/testutil"
)

// TestEncryptedGuest: `cvd checkout --encrypt` defines the desktop's VM on its
// encrypted chains (each layer's key an ephemeral libvirt secret); the tiny
// guest boots under libvirt, writes its pattern into the encrypted top and
// powers off; no laptop file holds the pattern; the check-in lands with it
// (the server's head reads it); a wipe at the agent's next contact removes
// the copy, its keys and its VM's secrets.
func TestEncryptedGuest(t *testing.T) {
	env := setupVMEnv(t)
	bin := buildCvd(t)
	work := t.TempDir()
	srv := filepath.Join(work, "server")
	ctx, cancel := context.WithTimeout(context.Background(), 6*time.Minute)
	defer cancel()

	p, conn := guestSite(ctx, t, env, bin, srv, "64M", "0xc7", "write -P 0x11 0 4M")
	var added struct {
		Token string `json:"token"`
	}
	json.Unmarshal([]byte(mustCvd(t, srv, "--json", "device", "add", "lap", "--desktop", "desk")), &added)
	d := &groupDevice{t: t, bin: bin, store: filepath.Join(work, "lap"), uri: env.uri, token: added.Token, conn: conn}
	d.must(nil, "--json", "checkout", "desk", "--server", p.url, "--encrypt")

	x, err := conn.DumpXML(ctx, "desk")
	if err != nil {
		t.Fatal(err)
	}
	if n := strings.Count(x, "<encryption format='luks'"); n < 3 {
		t.Fatalf("the domain declares %d encrypted layers (system top and layer, user top):\n%s", n, x)
	}
	log := d.runGuest(ctx)
	if !strings.Contains(log, "cvd-guest: pattern 0xc7") || !strings.Contains(log, "cvd-guest: poweroff") || strings.Contains(log, "error") {
		t.Fatalf("the guest on the encrypted desktop:\n%s", log)
	}
	key := strings.TrimSpace(mustCvd(t, srv, "device", "key", "lap", "--desktop", "desk"))
	sys := filepath.Join(d.store, "desktops", "desk.system.qcow2")
	objs, spec := testutil.LUKSImageOpts(sys, key, key)
	testutil.Run(t, "qemu-io", append(append([]string{"-r"}, objs...), "-c", "read -P 0xc7 1M 4k", "--image-opts", spec)...)
	pattern := bytes.Repeat([]byte{0xc7}, 4096)
	filepath.WalkDir(d.store, func(p string, e os.DirEntry, err error) error {
		if err == nil && e.Type().IsRegular() {
			if b, err := os.ReadFile(p); err == nil && bytes.Contains(b, pattern) {
				t.Errorf("%s holds the guest's pattern in plaintext", p)
			}
		}
		return nil
	})

	d.must(nil, "--json", "checkin", "desk")
	var show struct {
		System string `json:"system_path"`
	}
	json.Unmarshal([]byte(mustCvd(t, srv, "--json", "desktop", "show", "desk")), &show)
	testutil.Run(t, "qemu-io", "-r", "-f", "qcow2", "-c", "read -P 0xc7 1M 4k", show.System)

	mustCvd(t, srv, "device", "wipe", "lap")
	d.cvd("agent", "--once")
	if _, err := os.Stat(sys); !os.IsNotExist(err) {
		t.Fatalf("the wiped laptop's top: %v", err)
	}
	if ents, _ := os.ReadDir(filepath.Join(d.store, "sync", "keys")); len(ents) != 0 {
		t.Fatalf("keys left after the wipe: %v", ents)
	}
	if _, err := conn.DumpXML(ctx, "desk"); err == nil {
		t.Error("the wiped desktop's VM is still defined")
	}
}
