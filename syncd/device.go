package syncd

import (
	"cmp"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"database/sql"
	"encoding/base64"
	"encoding/hex"
	"fmt"
	"regexp"
	"slices"
	"time"

	"github.com/cvd-project/cvd/syncd/state"

	"github.com/cvd-project/cvd/catalog"
	"github.com/cvd-project/cvd/images"
	"github.com/cvd-project/cvd/syncd/proto"
)

// Device is a machine with a token: a laptop bound to desktops, which it checks
// out under a lease, or a hypervisor host of the site (Kind KindHost), which
// reads the sealed layers of every desktop and takes no lease. The server keeps
// only the SHA-256 of its token.
type Device struct {
	ID   string `json:"id"`
	Name string `json:"name"`
	Kind string `json:"kind"`
	// Class is the hardware class the device reported ("" for none): it
	// chooses the base variant under an apps policy.
	Class     string    `json:"class,omitempty"`
	Desktops  []string  `json:"desktops"`
	Bindings  []Binding `json:"bindings"`
	TokenHash string    `json:"token_sha256"`
	Created   time.Time `json:"created"`
}

// Binding is a device's place in a desktop's device group: which layers it
// holds (its policy) and what it last reported.
type Binding struct {
	Desktop string `json:"desktop"`
	Policy  string `json:"policy"`
	// Runs and Staged are the versions the device last said it runs and has
	// staged for its next start (0: none), Seen when it said so.
	Runs    int       `json:"runs,omitempty"`
	Staged  int       `json:"staged,omitempty"`
	Fetched int64     `json:"fetched_bytes,omitempty"` // stream bytes its last update received
	Seen    time.Time `json:"seen,omitzero"`
}

// Binding returns the device's binding to desktop, or nil.
func (d *Device) Binding(desktop string) *Binding {
	for i := range d.Bindings {
		if d.Bindings[i].Desktop == desktop {
			return &d.Bindings[i]
		}
	}
	return nil
}

// Kinds of device.
const (
	KindLaptop = "laptop"
	KindHost   = "host"
)

// Bound reports whether the device may check desktop out.
func (d *Device) Bound(desktop string) bool { return slices.Contains(d.Desktops, desktop) }

// Host reports whether the device is a hypervisor host.
func (d *Device) Host() bool { return d.Kind == KindHost }

func hashToken(tok string) string {
	s := sha256.Sum256([]byte(tok))
	return hex.EncodeToString(s[:])
}

// parseToken extracts the device ID from a token.
func parseToken(tok string) (string, bool) { return proto.TokenDevice(tok) }

func newToken() (id, tok string) {
	b := make([]byte, 8+32)
	if _, err := rand.Read(b); err != nil {
		panic(err) // crypto/rand does not fail on Linux
	}
	id = hex.EncodeToString(b[:8])
	return id, proto.TokenPrefix + id + "_" + base64.RawURLEncoding.EncodeToString(b[8:])
}

// The devices live in the catalog's devices and device_desktops tables (see
// catalog/migrations): the functions below are the only ones that touch them.

// queryDevices reads the devices that match where (SQL, "?" placeholders), with
// the desktops each is bound to.
func queryDevices(tx *catalog.Tx, where string, args ...any) ([]Device, error) {
	var out []Device
	err := tx.Query("SELECT id, name, kind, class, token_sha256, created FROM devices WHERE "+where+" ORDER BY name", args,
		func(scan func(dest ...any) error) error {
			var d Device
			if err := scan(&d.ID, &d.Name, &d.Kind, &d.Class, &d.TokenHash, &d.Created); err != nil {
				return err
			}
			d.Created, d.Desktops, d.Bindings = d.Created.UTC(), []string{}, []Binding{}
			out = append(out, d)
			return nil
		})
	if err != nil || len(out) == 0 {
		return out, err
	}
	at := map[string]*Device{}
	for i := range out {
		at[out[i].ID] = &out[i]
	}
	const cols = "SELECT device, desktop, policy, runs, staged, fetched, seen FROM device_desktops"
	q, bargs := cols+" ORDER BY device, desktop", []any(nil)
	if len(out) == 1 {
		q, bargs = cols+" WHERE device = ? ORDER BY desktop", []any{out[0].ID}
	}
	err = tx.Query(q, bargs, func(scan func(dest ...any) error) error {
		var (
			dev  string
			b    Binding
			seen sql.NullTime
		)
		if err := scan(&dev, &b.Desktop, &b.Policy, &b.Runs, &b.Staged, &b.Fetched, &seen); err != nil {
			return err
		}
		if seen.Valid {
			b.Seen = seen.Time.UTC()
		}
		if d := at[dev]; d != nil {
			d.Desktops = append(d.Desktops, b.Desktop)
			d.Bindings = append(d.Bindings, b)
		}
		return nil
	})
	return out, err
}

func oneDevice(tx *catalog.Tx, where string, args ...any) (*Device, error) {
	ds, err := queryDevices(tx, where, args...)
	if err != nil || len(ds) == 0 {
		return nil, err
	}
	return &ds[0], nil
}

// bind records that device id is in the device groups of desktops, with
// policy ("": full for a new binding, unchanged for an existing one).
func bind(tx *catalog.Tx, id string, desktops []string, policy string) error {
	for _, dk := range desktops {
		q := "INSERT INTO device_desktops (device, desktop, policy) VALUES (?, ?, ?) ON CONFLICT (device, desktop) DO NOTHING"
		if policy != "" {
			q = "INSERT INTO device_desktops (device, desktop, policy) VALUES (?, ?, ?) ON CONFLICT (device, desktop) DO UPDATE SET policy = excluded.policy"
		}
		if _, err := tx.Exec(q, id, dk, cmp.Or(policy, proto.PolicyFull)); err != nil {
			return err
		}
	}
	return nil
}

// addDevice registers a device of kind bound to desktops and returns it with its
// token, which is shown once and never stored.
func addDevice(s *state.State, name, kind string, o DeviceOptions, now time.Time) (*Device, string, error) {
	if err := images.CheckObjectName("device", name); err != nil {
		return nil, "", err
	}
	if err := checkClass(o.Class); err != nil {
		return nil, "", err
	}
	if err := proto.CheckPolicy(o.Policy); err != nil {
		return nil, "", err
	}
	id, tok := newToken()
	d := &Device{ID: id, Name: name, Kind: kind, Class: o.Class, Desktops: slices.Compact(slices.Sorted(slices.Values(o.Desktops))),
		TokenHash: hashToken(tok), Created: now.UTC().Truncate(time.Second)}
	err := s.Update(func(tx *catalog.Tx) (err error) {
		if old, err := oneDevice(tx, "name = ?", name); err != nil {
			return err
		} else if old != nil {
			return fmt.Errorf("device %s: %w", name, images.ErrExists)
		}
		if err := insertDevice(tx, d); err != nil {
			return err
		}
		if err := bind(tx, d.ID, d.Desktops, o.Policy); err != nil {
			return err
		}
		d, err = deviceByName(tx, name)
		return err
	})
	if err != nil {
		return nil, "", err
	}
	return d, tok, nil
}

// DeviceOptions says how a new device is registered.
type DeviceOptions struct {
	Desktops []string // the desktops whose device groups it joins
	Policy   string   // its policy in them ("": full)
	Class    string   // its hardware class ("": none)
}

var classRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$`)

func checkClass(c string) error {
	if c != "" && !classRE.MatchString(c) {
		return proto.BadRequest("hardware class %q: want letters, digits, '.', '_', '-' (at most 64)", c)
	}
	return nil
}

func insertDevice(tx *catalog.Tx, d *Device) error {
	_, err := tx.Exec("INSERT INTO devices (id, name, kind, class, token_sha256, created) VALUES (?, ?, ?, ?, ?, ?)",
		d.ID, d.Name, cmp.Or(d.Kind, KindLaptop), d.Class, d.TokenHash, d.Created.UTC())
	return err
}

// bindDevice adds desktops to an existing device, or changes its policy in
// their device groups (policy "": full for a new binding, else unchanged).
func bindDevice(s *state.State, name string, desktops []string, policy string) (*Device, error) {
	if err := proto.CheckPolicy(policy); err != nil {
		return nil, err
	}
	var d *Device
	err := s.Update(func(tx *catalog.Tx) error {
		var err error
		if d, err = deviceByName(tx, name); err != nil {
			return err
		}
		if err := bind(tx, d.ID, desktops, policy); err != nil {
			return err
		}
		d, err = deviceByName(tx, name)
		return err
	})
	return d, err
}

// setPolicy changes a device's policy in the groups of desktops (bound
// already) and its class.
func setPolicy(s *state.State, name string, desktops []string, policy, class string) (*Device, error) {
	if err := proto.CheckPolicy(policy); err != nil {
		return nil, err
	}
	if err := checkClass(class); err != nil {
		return nil, err
	}
	var d *Device
	err := s.Update(func(tx *catalog.Tx) error {
		var err error
		if d, err = deviceByName(tx, name); err != nil {
			return err
		}
		for _, dk := range desktops {
			if !d.Bound(dk) {
				return fmt.Errorf("device %s is not in the device group of %s: %w (cvd device bind)", name, dk, proto.ErrNotFound)
			}
			if policy != "" {
				if _, err := tx.Exec("UPDATE device_desktops SET policy = ? WHERE device = ? AND desktop = ?", policy, d.ID, dk); err != nil {
					return err
				}
			}
		}
		if class != "" {
			if _, err := tx.Exec("UPDATE devices SET class = ? WHERE id = ?", class, d.ID); err != nil {
				return err
			}
		}
		d, err = deviceByName(tx, name)
		return err
	})
	return d, err
}

func deviceByName(tx *catalog.Tx, name string) (*Device, error) {
	d, err := oneDevice(tx, "name = ?", name)
	if err == nil && d == nil {
		err = fmt.Errorf("device %s: %w", name, proto.ErrNotFound)
	}
	return d, err
}

// removeDevice forgets a device; its token stops working at once. An active lease
// it holds is broken.
func removeDevice(s *state.State, name string, now time.Time) (*Device, error) {
	var d *Device
	err := s.Update(func(tx *catalog.Tx) error {
		var err error
		if d, err = deviceByName(tx, name); err != nil {
			return err
		}
		if err := breakDeviceLeases(tx, d, now); err != nil {
			return err
		}
		if _, err := tx.Exec("DELETE FROM device_desktops WHERE device = ?", d.ID); err != nil {
			return err
		}
		_, err = tx.Exec("DELETE FROM devices WHERE id = ?", d.ID)
		return err
	})
	return d, err
}

// breakDeviceLeases ends every active lease the device holds.
func breakDeviceLeases(tx *catalog.Tx, d *Device, now time.Time) error {
	held, err := queryLeases(tx, "device = ? AND state = 'active'", d.ID)
	if err != nil {
		return err
	}
	for i := range held {
		if err := endLease(tx, &held[i], "broken", now); err != nil {
			return err
		}
	}
	return nil
}

func devices(s *state.State) ([]Device, error) {
	var out []Device
	err := s.View(func(tx *catalog.Tx) error {
		var err error
		out, err = queryDevices(tx, "1 = 1")
		return err
	})
	return out, err
}

// dummyHash keeps the work of a lookup of an unknown device the same as of a known
// one.
var dummyHash = hashToken("cvd1_0000000000000000_unknown-device-token-placeholder")

// authenticate returns the device a bearer token belongs to. The comparison of
// hashes takes constant time. A device ordered wiped gets ErrWiped (looked up
// in the same read of the catalog).
func authenticate(s *state.State, tok string) (*Device, error) {
	id, ok := parseToken(tok)
	h := hashToken(tok)
	if !ok {
		subtle.ConstantTimeCompare([]byte(h), []byte(dummyHash))
		return nil, fmt.Errorf("%w: malformed device token", proto.ErrUnauthorized)
	}
	var d *Device
	var gone bool
	err := s.View(func(tx *catalog.Tx) error {
		var err error
		if d, err = oneDevice(tx, "id = ?", id); err != nil || d == nil {
			return err
		}
		gone, err = wiped(tx, d)
		return err
	})
	if err != nil {
		return nil, err
	}
	want := dummyHash
	if d != nil {
		want = d.TokenHash
	}
	if subtle.ConstantTimeCompare([]byte(h), []byte(want)) != 1 || d == nil {
		return nil, fmt.Errorf("%w: wrong device token", proto.ErrUnauthorized)
	}
	if gone {
		return nil, fmt.Errorf("device %s: %w: shred the encrypted copies", d.Name, proto.ErrWiped)
	}
	return d, nil
}
