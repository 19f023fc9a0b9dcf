package laptop

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/hkdf"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/cvd-project/cvd/disk"
	"github.com/cvd-project/cvd/images"
	"github.com/cvd-project/cvd/internal/fsutil"
	"github.com/cvd-project/cvd/syncd/proto"
)

// An encrypted copy's layers are LUKS qcow2 files whose passphrase is the copy's
// key (KEK) the server escrows. The laptop keeps KEK in <store>/sync/keys/<desktop>.json
// (mode 0600) sealed with AES-256-GCM under a key derived (HKDF-SHA256) from
// the lease's wrapping material and bound to the lease's ID and expiry: a key
// file whose expiry was edited does not open. Past the expiry (by the clock's
// high-water mark, so that turning the clock back does not help) the key is
// not used, and the purge destroys the key file and the LUKS key slots of the
// copy's files before it deletes them.

const (
	keysDir   = "keys"
	clockFile = "clock" // the clock's high-water mark (Unix nanoseconds, big-endian)
)

// keyFile is a copy's key at rest.
type keyFile struct {
	Desktop string    `json:"desktop"`
	Lease   string    `json:"lease"`
	Expires time.Time `json:"expires"`
	Wrap    string    `json:"wrap"`   // hex, from the server for the lease
	Sealed  string    `json:"sealed"` // hex: nonce || AES-GCM(wrapping key, KEK)
}

func (l *Laptop) keyPath(desktop string) string {
	return filepath.Join(l.st.Dir, keysDir, desktop+".json")
}

// wrapAEAD derives the key-wrapping cipher of a key file.
func wrapAEAD(k *keyFile) (cipher.AEAD, error) {
	w, err := hex.DecodeString(k.Wrap)
	if err != nil || len(w) != 32 {
		return nil, fmt.Errorf("key of %s: bad wrapping material", k.Desktop)
	}
	info := k.Desktop + "\x00" + k.Lease + "\x00" + strconv.FormatInt(k.Expires.Unix(), 10)
	key, err := hkdf.Key(sha256.New, w, nil, "cvd copy key "+info, 32)
	if err != nil {
		return nil, err
	}
	b, err := aes.NewCipher(key)
	if err != nil {
		return nil, err
	}
	return cipher.NewGCM(b)
}

// saveKey keeps kek for desktop under lease, replacing any earlier key file.
func (l *Laptop) saveKey(desktop string, lease proto.Lease, wrap string, kek []byte) error {
	k := &keyFile{Desktop: desktop, Lease: lease.ID, Expires: lease.Expires.UTC().Truncate(time.Second), Wrap: wrap}
	aead, err := wrapAEAD(k)
	if err != nil {
		return err
	}
	nonce := make([]byte, aead.NonceSize())
	if _, err := rand.Read(nonce); err != nil {
		return err
	}
	k.Sealed = hex.EncodeToString(aead.Seal(nonce, nonce, kek, nil))
	b, err := json.Marshal(k)
	if err != nil {
		return err
	}
	dir := filepath.Join(l.st.Dir, keysDir)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return proto.NoSpace(err)
	}
	return proto.NoSpace(writeFileAtomic(l.keyPath(desktop), b))
}

// storeLeaseKey keeps the key a check-out's manifest carries.
func (l *Laptop) storeLeaseKey(desktop string, lease proto.Lease, k *proto.LeaseKey) error {
	kek, err := hex.DecodeString(k.KEK)
	if err != nil || len(kek) != 32 {
		return fmt.Errorf("server's manifest: bad copy key")
	}
	return l.saveKey(desktop, lease, k.Wrap, []byte(k.KEK))
}

// copyKey opens desktop's key: nil, nil when the copy is not encrypted;
// proto.ErrLeaseExpired past the lease's expiry.
func (l *Laptop) copyKey(desktop string) ([]byte, error) {
	b, err := os.ReadFile(l.keyPath(desktop))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var k keyFile
	if err := json.Unmarshal(b, &k); err != nil {
		return nil, fmt.Errorf("key of %s: %w", desktop, err)
	}
	if !l.now().Before(k.Expires) {
		return nil, fmt.Errorf("key of %s: %w at %s", desktop, proto.ErrLeaseExpired, k.Expires.Format(time.RFC3339))
	}
	aead, err := wrapAEAD(&k)
	if err != nil {
		return nil, err
	}
	sealed, err := hex.DecodeString(k.Sealed)
	if err != nil || len(sealed) < aead.NonceSize() {
		return nil, fmt.Errorf("key of %s: sealed key truncated", desktop)
	}
	kek, err := aead.Open(nil, sealed[:aead.NonceSize()], sealed[aead.NonceSize():], nil)
	if err != nil {
		return nil, fmt.Errorf("key of %s: it does not open (the file was altered)", desktop)
	}
	return kek, nil
}

// rewrapKey binds desktop's key to a renewed lease (a new expiry).
func (l *Laptop) rewrapKey(desktop string, lease proto.Lease) error {
	kek, err := l.copyKey(desktop)
	if err != nil || kek == nil {
		return err
	}
	b, err := os.ReadFile(l.keyPath(desktop))
	if err != nil {
		return err
	}
	var k keyFile
	if err := json.Unmarshal(b, &k); err != nil {
		return err
	}
	if k.Lease == lease.ID && k.Expires.Equal(lease.Expires.UTC().Truncate(time.Second)) {
		return nil
	}
	return l.saveKey(desktop, lease, k.Wrap, kek)
}

// liveKeys are the keys of the copies whose leases have not expired: the
// keyring every layer open of this process tries.
func (l *Laptop) liveKeys(string) ([][]byte, error) {
	ents, err := os.ReadDir(filepath.Join(l.st.Dir, keysDir))
	if err != nil {
		return nil, nil
	}
	var out [][]byte
	for _, e := range ents {
		name, ok := strings.CutSuffix(e.Name(), ".json")
		if !ok {
			continue
		}
		if k, err := l.copyKey(name); err == nil && k != nil {
			out = append(out, k)
		}
	}
	return out, nil
}

// topEncryption encrypts the tops of a desktop whose copy has a key; a key
// file that does not open (expired, altered) refuses the top rather than let
// it be plain.
func (l *Laptop) topEncryption(rel string) (*disk.Encryption, error) {
	base, ok := strings.CutPrefix(rel, images.DesktopsDir+"/")
	if !ok {
		return nil, nil
	}
	name := strings.TrimSuffix(strings.TrimSuffix(base, ".qcow2"), filepath.Ext(strings.TrimSuffix(base, ".qcow2")))
	k, err := l.copyKey(name)
	if err != nil || k == nil {
		return nil, err
	}
	return &disk.Encryption{Key: k}, nil
}

// shredCopy crypto-shreds desktop's encrypted copy: it finds the files its key
// opens (the tops and the layers below them), destroys the key file, then the
// LUKS key slots of those files. The files are deleted afterwards by the
// caller; the data is gone already if they survive. It works with the key
// expired too (the purge runs then).
func (l *Laptop) shredCopy(desktop string) ([]string, error) {
	path := l.keyPath(desktop)
	b, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var files []string
	var k keyFile
	if json.Unmarshal(b, &k) == nil {
		if aead, err := wrapAEAD(&k); err == nil {
			if sealed, err := hex.DecodeString(k.Sealed); err == nil && len(sealed) >= aead.NonceSize() {
				if kek, err := aead.Open(nil, sealed[:aead.NonceSize()], sealed[aead.NonceSize():], nil); err == nil {
					files = l.filesOpenedBy(desktop, kek)
				}
			}
		}
	}
	// The key first: overwritten, synced, removed.
	if f, err := os.OpenFile(path, os.O_WRONLY, 0); err == nil {
		junk := make([]byte, len(b))
		rand.Read(junk)
		f.WriteAt(junk, 0)
		f.Sync()
		f.Close()
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return nil, err
	}
	var errs []error
	for _, p := range files {
		if err := disk.ShredKeys(p); err != nil {
			errs = append(errs, err)
		}
	}
	l.log.Warn("shredded the keys of an encrypted copy", "desktop", desktop, "files", len(files))
	return files, errors.Join(errs...)
}

// dropShredded removes from the store the layers among files (top first) that
// a shred made unreadable; one something else stands on stays (and reads no
// more).
func (l *Laptop) dropShredded(files []string) {
	for _, p := range files {
		id, ok := strings.CutSuffix(filepath.Base(p), ".qcow2")
		if !ok || p != l.store.LayerPath(id) {
			continue
		}
		if _, err := l.store.RemoveLayer(id); err != nil && !errors.Is(err, images.ErrNotFound) {
			l.log.Warn("a shredded layer stays in the store", "layer", id, "err", err)
		}
	}
}

// filesOpenedBy lists desktop's tops and the layers below them that kek
// opens.
func (l *Laptop) filesOpenedBy(desktop string, kek []byte) []string {
	d, err := l.store.Desktop(desktop)
	if err != nil {
		return nil
	}
	seen := map[string]bool{}
	var out []string
	for _, rel := range []string{d.SystemDisk, d.UserDisk} {
		if rel == "" {
			continue
		}
		for p := l.store.Path(rel); p != "" && !seen[p]; {
			seen[p] = true
			img, err := disk.Open(p, disk.OpenOptions{ReadOnly: true, NoBacking: true, Keys: disk.Keys(kek)})
			if err != nil {
				break
			}
			in := img.Info()
			img.Close()
			if in.Encrypted && in.Unlocked {
				out = append(out, p)
			}
			if in.BackingName == "" {
				break
			}
			next := in.BackingName
			if !filepath.IsAbs(next) {
				next = filepath.Join(filepath.Dir(p), next)
			}
			p = next
		}
	}
	return out
}

// clock is the laptop's high-water mark of time: a clock turned back does not
// make an expired lease valid again, nor stop a lease from running out. Time
// is the latest of the wall clock and the mark seen at open plus the
// monotonic time since; the mark is persisted at each second of progress.
type clock struct {
	mu        sync.Mutex
	path      string
	hwm       time.Time
	opened    time.Time // monotonic reading at open
	persisted time.Time
}

func newClock(dir string) *clock {
	c := &clock{path: filepath.Join(dir, clockFile), opened: time.Now()}
	if b, err := os.ReadFile(c.path); err == nil && len(b) == 8 {
		c.hwm = time.Unix(0, int64(binary.BigEndian.Uint64(b)))
		c.persisted = c.hwm
	}
	return c
}

// now is max(real, the mark at open + time since open).
func (c *clock) now(real time.Time) time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	t := real
	if !c.hwm.IsZero() {
		if m := c.hwm.Add(time.Since(c.opened)); m.After(t) {
			t = m
		}
	}
	if t.Sub(c.persisted) >= time.Second {
		var b [8]byte
		binary.BigEndian.PutUint64(b[:], uint64(t.UnixNano()))
		if writeFileAtomic(c.path, b[:]) == nil {
			c.persisted = t
		}
	}
	return t
}

// laptopNow is the clock of a store's sync directory (for the purge that runs
// before a Laptop is open).
func laptopNow(syncDir string) time.Time { return newClock(syncDir).now(time.Now()) }

// writeFileAtomic writes b to path (mode 0600) through a synced temporary file
// renamed over it.
func writeFileAtomic(path string, b []byte) error {
	tmp := path + ".tmp"
	err := writeFileSync(tmp, b)
	if err == nil {
		err = os.Rename(tmp, path)
	}
	if err != nil {
		os.Remove(tmp)
		return err
	}
	return fsutil.Sync(filepath.Dir(path))
}
