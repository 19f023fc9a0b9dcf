package syncd

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"time"

	"github.com/cvd-project/cvd/catalog"
	"github.com/cvd-project/cvd/syncd/proto"
	"github.com/cvd-project/cvd/syncd/state"
)

// escrowedKey is a device's key for its encrypted copy of a desktop, sealed
// with the server's master key.
type escrowedKey struct {
	Device  string    `json:"device"`
	Desktop string    `json:"desktop"`
	Sealed  []byte    `json:"sealed"` // nonce || AES-256-GCM(master, KEK), bound to device/desktop
	Created time.Time `json:"created"`
}

// masterAEAD loads (or makes, 0600, on first use) the master key.
func (s *Server) masterAEAD() (cipher.AEAD, error) {
	s.masterMu.Lock()
	defer s.masterMu.Unlock()
	if s.master != nil {
		return s.master, nil
	}
	path := s.opts.MasterKeyFile
	if path == "" {
		path = filepath.Join(s.st.Dir, "master.key")
	}
	key, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		key = make([]byte, 32)
		if _, err := rand.Read(key); err != nil {
			return nil, err
		}
		f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
		if err != nil {
			return nil, proto.NoSpace(fmt.Errorf("master key: %w", err))
		}
		_, err = f.Write(key)
		if err == nil {
			err = f.Sync()
		}
		if cerr := f.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			os.Remove(path)
			return nil, proto.NoSpace(fmt.Errorf("master key: %w", err))
		}
		s.log.Info("made the master key that seals escrowed copy keys", "path", path)
	} else if err != nil {
		return nil, fmt.Errorf("master key: %w", err)
	}
	if len(key) != 32 {
		return nil, fmt.Errorf("master key %s: %d bytes, want 32", path, len(key))
	}
	b, err := aes.NewCipher(key)
	if err != nil {
		return nil, err
	}
	if s.master, err = cipher.NewGCM(b); err != nil {
		return nil, err
	}
	return s.master, nil
}

// copyKey returns the key of dev's encrypted copy of desktop, made and
// escrowed the first time, with fresh wrapping material for this lease.
func (s *Server) copyKey(tx *catalog.Tx, dev *Device, desktop string) (*proto.LeaseKey, error) {
	aead, err := s.masterAEAD()
	if err != nil {
		return nil, err
	}
	id := dev.ID + "/" + desktop
	kek, ok, err := unsealKey(tx, aead, id)
	if err != nil {
		return nil, err
	}
	if !ok {
		kek = make([]byte, 32)
		if _, err := rand.Read(kek); err != nil {
			return nil, err
		}
		nonce := make([]byte, aead.NonceSize())
		if _, err := rand.Read(nonce); err != nil {
			return nil, err
		}
		rec := escrowedKey{Device: dev.ID, Desktop: desktop, Sealed: aead.Seal(nonce, nonce, kek, []byte(id)), Created: s.now().UTC()}
		if err := state.PutJSON(tx, state.BucketKeys, id, &rec); err != nil {
			return nil, err
		}
	}
	wrap := make([]byte, 32)
	if _, err := rand.Read(wrap); err != nil {
		return nil, err
	}
	return &proto.LeaseKey{KEK: hex.EncodeToString(kek), Wrap: hex.EncodeToString(wrap)}, nil
}

// unsealKey opens the escrowed key id; ok is false when there is none.
func unsealKey(tx *catalog.Tx, aead cipher.AEAD, id string) (kek []byte, ok bool, err error) {
	var rec escrowedKey
	if ok, err = state.GetJSON(tx, state.BucketKeys, id, &rec); err != nil || !ok {
		return nil, false, err
	}
	ns := aead.NonceSize()
	if len(rec.Sealed) < ns {
		return nil, false, fmt.Errorf("escrowed key %s: truncated", id)
	}
	if kek, err = aead.Open(nil, rec.Sealed[:ns], rec.Sealed[ns:], []byte(id)); err != nil {
		return nil, false, fmt.Errorf("escrowed key %s: the master key does not open it: %w", id, err)
	}
	return kek, true, nil
}

// EscrowedKey returns the escrowed key of device's encrypted copy of desktop
// (for recovery by the administrator).
func (s *Server) EscrowedKey(device, desktop string) (string, error) {
	aead, err := s.masterAEAD()
	if err != nil {
		return "", err
	}
	var kek []byte
	err = s.st.View(func(tx *catalog.Tx) error {
		d, err := deviceByName(tx, device)
		if err != nil {
			return err
		}
		var ok bool
		if kek, ok, err = unsealKey(tx, aead, d.ID+"/"+desktop); err != nil {
			return err
		}
		if !ok {
			return fmt.Errorf("device %s, desktop %s: %w: no escrowed key", device, desktop, proto.ErrNotFound)
		}
		return nil
	})
	return hex.EncodeToString(kek), err
}

// WipeDevice orders the device wiped: its leases are broken, and its next
// request (whatever it is) gets ErrWiped, at which the device shreds its
// encrypted copies. The device stays registered, refused, until it is
// removed (RemoveDevice) and added again.
func (s *Server) WipeDevice(name string) (*Device, error) {
	var d *Device
	now := s.now()
	err := s.st.Update(func(tx *catalog.Tx) error {
		var err error
		if d, err = deviceByName(tx, name); err != nil {
			return err
		}
		if err := breakDeviceLeases(tx, d, now); err != nil {
			return err
		}
		return state.PutJSON(tx, state.BucketWipes, d.ID, now.UTC())
	})
	if err == nil {
		s.log.Info("device wipe ordered", "device", name)
	}
	return d, err
}

// wiped reports whether a wipe of the device was ordered.
func wiped(tx *catalog.Tx, dev *Device) (bool, error) {
	var at time.Time
	return state.GetJSON(tx, state.BucketWipes, dev.ID, &at)
}
