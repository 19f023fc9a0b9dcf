package syncd

import (
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/base64"
	"encoding/hex"
	"fmt"
	"regexp"
	"slices"
	"sort"
	"strings"
	"time"

	"github.com/cvd-project/cvd/catalog"
	"github.com/cvd-project/cvd/images"
)

// Device is a host bound to desktops: a laptop that checks them out. The server
// keeps only the SHA-256 of its token.
type Device struct {
	ID        string    `json:"id"`
	Name      string    `json:"name"`
	Desktops  []string  `json:"desktops"`
	TokenHash string    `json:"token_sha256"`
	Created   time.Time `json:"created"`
}

// Bound reports whether the device may check desktop out.
func (d *Device) Bound(desktop string) bool { return slices.Contains(d.Desktops, desktop) }

// tokenPrefix starts every device token: "cvd1_<device id>_<secret>".
const tokenPrefix = "cvd1_"

var deviceIDRE = regexp.MustCompile(`^[0-9a-f]{16}$`)

func hashToken(tok string) string {
	s := sha256.Sum256([]byte(tok))
	return hex.EncodeToString(s[:])
}

// parseToken extracts the device ID from a token.
func parseToken(tok string) (string, bool) {
	rest, ok := strings.CutPrefix(tok, tokenPrefix)
	if !ok {
		return "", false
	}
	id, secret, ok := strings.Cut(rest, "_")
	if !ok || !deviceIDRE.MatchString(id) || len(secret) < 32 {
		return "", false
	}
	return id, true
}

func newToken() (id, tok string) {
	b := make([]byte, 8+32)
	if _, err := rand.Read(b); err != nil {
		panic(err) // crypto/rand does not fail on Linux
	}
	id = hex.EncodeToString(b[:8])
	return id, tokenPrefix + id + "_" + base64.RawURLEncoding.EncodeToString(b[8:])
}

// addDevice registers a device bound to desktops and returns it with its token,
// which is shown once and never stored.
func (s *state) addDevice(name string, desktops []string, now time.Time) (*Device, string, error) {
	if err := images.CheckObjectName("device", name); err != nil {
		return nil, "", err
	}
	id, tok := newToken()
	d := &Device{ID: id, Name: name, Desktops: desktops, TokenHash: hashToken(tok), Created: now.UTC().Truncate(time.Second)}
	sort.Strings(d.Desktops)
	err := s.update(func(tx *catalog.Tx) error {
		if tx.Bucket(bucketDevNames).Get([]byte(name)) != nil {
			return fmt.Errorf("device %s: %w", name, images.ErrExists)
		}
		if err := tx.Bucket(bucketDevNames).Put([]byte(name), []byte(id)); err != nil {
			return err
		}
		return putJSON(tx, bucketDevices, id, d)
	})
	if err != nil {
		return nil, "", err
	}
	return d, tok, nil
}

// bindDevice adds desktops to an existing device.
func (s *state) bindDevice(name string, desktops []string) (*Device, error) {
	var d *Device
	err := s.update(func(tx *catalog.Tx) error {
		var err error
		d, err = deviceByName(tx, name)
		if err != nil {
			return err
		}
		for _, dk := range desktops {
			if !d.Bound(dk) {
				d.Desktops = append(d.Desktops, dk)
			}
		}
		sort.Strings(d.Desktops)
		return putJSON(tx, bucketDevices, d.ID, d)
	})
	return d, err
}

func deviceByName(tx *catalog.Tx, name string) (*Device, error) {
	id := tx.Bucket(bucketDevNames).Get([]byte(name))
	if id == nil {
		return nil, fmt.Errorf("device %s: %w", name, ErrNotFound)
	}
	var d Device
	if ok, err := getJSON(tx, bucketDevices, string(id), &d); err != nil || !ok {
		return nil, fmt.Errorf("device %s: record missing: %w", name, ErrNotFound)
	}
	return &d, nil
}

// removeDevice forgets a device; its token stops working at once. An active lease
// it holds is broken.
func (s *state) removeDevice(name string, now time.Time) (*Device, error) {
	var d *Device
	err := s.update(func(tx *catalog.Tx) error {
		var err error
		d, err = deviceByName(tx, name)
		if err != nil {
			return err
		}
		for _, dk := range d.Desktops {
			var l Lease
			if ok, _ := getJSON(tx, bucketLeases, dk, &l); ok && l.Device == d.ID {
				if err := endLease(tx, &l, "broken", now); err != nil {
					return err
				}
			}
		}
		if err := tx.Bucket(bucketDevNames).Delete([]byte(name)); err != nil {
			return err
		}
		return tx.Bucket(bucketDevices).Delete([]byte(d.ID))
	})
	return d, err
}

func (s *state) devices() ([]Device, error) {
	var out []Device
	err := s.view(func(tx *catalog.Tx) error {
		return tx.Bucket(bucketDevices).ForEach(func(k, v []byte) error {
			var d Device
			if _, err := getJSON(tx, bucketDevices, string(k), &d); err != nil {
				return err
			}
			out = append(out, d)
			return nil
		})
	})
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out, err
}

// dummyHash keeps the work of a lookup of an unknown device the same as of a known
// one.
var dummyHash = hashToken("cvd1_0000000000000000_unknown-device-token-placeholder")

// authenticate returns the device a bearer token belongs to. The comparison of
// hashes takes constant time.
func (s *state) authenticate(tok string) (*Device, error) {
	id, ok := parseToken(tok)
	h := hashToken(tok)
	if !ok {
		subtle.ConstantTimeCompare([]byte(h), []byte(dummyHash))
		return nil, fmt.Errorf("%w: malformed device token", ErrUnauthorized)
	}
	var d Device
	var found bool
	err := s.view(func(tx *catalog.Tx) error {
		var err error
		found, err = getJSON(tx, bucketDevices, id, &d)
		return err
	})
	if err != nil {
		return nil, err
	}
	want := dummyHash
	if found {
		want = d.TokenHash
	}
	if subtle.ConstantTimeCompare([]byte(h), []byte(want)) != 1 || !found {
		return nil, fmt.Errorf("%w: wrong device token", ErrUnauthorized)
	}
	return &d, nil
}
