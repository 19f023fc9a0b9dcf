package syncd

import (
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"slices"
	"time"

	"github.com/cvd-project/cvd/catalog"
	"github.com/cvd-project/cvd/images"
)

// Lease is a device's hold on a desktop: while it is active and not expired, no
// other device can check the desktop out. The laptop purges its copy once Expires
// has passed, whether or not it can reach the server.
type Lease struct {
	ID         string    `json:"id"`
	Desktop    string    `json:"desktop"`
	Device     string    `json:"device"` // device ID
	DeviceName string    `json:"device_name"`
	Granted    time.Time `json:"granted"`
	Expires    time.Time `json:"expires"`
	Version    int       `json:"version"` // the version checked out
	// State is set in the lease log: active, released, broken (by an administrator
	// or a removed device), expired (ended past its expiry).
	State string    `json:"state,omitempty"`
	Ended time.Time `json:"ended,omitzero"`
}

// Expired reports whether the lease is past its expiry at now.
func (l *Lease) Expired(now time.Time) bool { return !now.Before(l.Expires) }

func newLeaseID() string {
	b := make([]byte, 12)
	if _, err := rand.Read(b); err != nil {
		panic(err)
	}
	return hex.EncodeToString(b)
}

func activeLease(tx *catalog.Tx, desktop string) (*Lease, error) {
	var l Lease
	ok, err := getJSON(tx, bucketLeases, desktop, &l)
	if err != nil || !ok {
		return nil, err
	}
	return &l, nil
}

// CheckNotHeld refuses (a *LeaseError wrapping ErrLeaseHeld, naming the holder)
// when a device holds an unexpired lease on the desktop in the store: the
// desktop is out on that device and must not be removed under it.
func CheckNotHeld(store *images.Store, desktop string, now time.Time) error {
	var l *Lease
	err := store.Catalog().View(func(tx *catalog.Tx) error {
		var err error
		l, err = activeLease(tx, desktop)
		return err
	})
	if err != nil || l == nil || l.Expired(now) {
		return err
	}
	return leaseHeld(l, ErrLeaseHeld)
}

// PinnedVersions lists the versions of a desktop that sync still stands on: the
// version an unexpired lease was granted on (its device's check-in starts
// there), and the base of every check-in being received. A prune keeps them.
func PinnedVersions(store *images.Store, desktop string, now time.Time) ([]int, error) {
	var out []int
	err := store.Catalog().View(func(tx *catalog.Tx) error {
		l, err := activeLease(tx, desktop)
		if err != nil {
			return err
		}
		if l != nil && !l.Expired(now) {
			out = append(out, l.Version)
		}
		return tx.Bucket(bucketSessions).ForEach(func(k, v []byte) error {
			var se Session
			if err := json.Unmarshal(v, &se); err != nil {
				return fmt.Errorf("check-in %s: %w", k, err)
			}
			if se.Desktop == desktop && se.State == stateReceiving {
				out = append(out, se.Base)
			}
			return nil
		})
	})
	return out, err
}

// endLease moves the active lease l into the log with its end state.
func endLease(tx *catalog.Tx, l *Lease, st string, now time.Time) error {
	l.State, l.Ended = st, now.UTC()
	if err := putJSON(tx, bucketLeaseLog, l.ID, l); err != nil {
		return err
	}
	return tx.Bucket(bucketLeases).Delete([]byte(l.Desktop))
}

func leaseHeld(l *Lease, err error) error {
	return &LeaseError{Desktop: l.Desktop, Holder: l.DeviceName, Expires: l.Expires.UTC().Format(time.RFC3339), Err: err}
}

// grantLease gives dev the lease on desktop for ttl, or renews the one it holds.
// Another device's unexpired lease refuses it with a *LeaseError.
func grantLease(tx *catalog.Tx, desktop string, dev *Device, ttl time.Duration, version int, now time.Time) (*Lease, bool, error) {
	l, err := activeLease(tx, desktop)
	if err != nil {
		return nil, false, err
	}
	if l != nil {
		switch {
		case l.Device != dev.ID && !l.Expired(now):
			return nil, false, leaseHeld(l, ErrLeaseHeld)
		case l.Device == dev.ID && !l.Expired(now):
			l.Expires = now.Add(ttl).UTC()
			l.Version = version
			return l, false, putJSON(tx, bucketLeases, desktop, l)
		default:
			if err := endLease(tx, l, "expired", now); err != nil {
				return nil, false, err
			}
		}
	}
	nl := &Lease{ID: newLeaseID(), Desktop: desktop, Device: dev.ID, DeviceName: dev.Name,
		Granted: now.UTC(), Expires: now.Add(ttl).UTC(), Version: version, State: "active"}
	if err := putJSON(tx, bucketLeases, desktop, nl); err != nil {
		return nil, false, err
	}
	return nl, true, putJSON(tx, bucketLeaseLog, nl.ID, nl)
}

// ownLease returns dev's active, unexpired lease on desktop with ID id.
func ownLease(tx *catalog.Tx, desktop string, dev *Device, id string, now time.Time) (*Lease, error) {
	l, err := activeLease(tx, desktop)
	if err != nil {
		return nil, err
	}
	if l != nil && l.ID == id && l.Device == dev.ID {
		if l.Expired(now) {
			return nil, fmt.Errorf("desktop %s: %w at %s: check it out again", desktop, ErrLeaseExpired, l.Expires.Format(time.RFC3339))
		}
		return l, nil
	}
	var old Lease
	if ok, err := getJSON(tx, bucketLeaseLog, id, &old); err != nil {
		return nil, err
	} else if ok && old.Device == dev.ID && old.Desktop == desktop {
		switch old.State {
		case "expired":
			return nil, fmt.Errorf("desktop %s: %w at %s: check it out again", desktop, ErrLeaseExpired, old.Expires.Format(time.RFC3339))
		case "broken":
			return &old, fmt.Errorf("desktop %s: %w: the lease was broken by an administrator", desktop, ErrNoLease)
		default:
			return nil, fmt.Errorf("desktop %s: %w: the lease was %s", desktop, ErrNoLease, old.State)
		}
	}
	if l != nil && l.Device != dev.ID && !l.Expired(now) {
		return nil, leaseHeld(l, ErrLeaseHeld)
	}
	return nil, fmt.Errorf("desktop %s: %w held by this device", desktop, ErrNoLease)
}

// leaseMark is how the catalog shows a desktop's active lease (Desktop.Lease):
// "" when none, else "<device> until <expiry>". Other packages (overlay's
// recompose) take a desktop with a mark as in use.
func leaseMark(l *Lease, now time.Time) string {
	if l == nil || l.Expired(now) {
		return ""
	}
	return l.DeviceName + " until " + l.Expires.UTC().Format(time.RFC3339)
}

// markCatalog writes the desktops' active leases and bound devices into their
// catalog records, when they changed. Failures are logged: the mark is a hint for
// other tools, syncd's own state is the authority.
func (s *Server) markCatalog(desktops ...string) {
	devs, _ := s.st.devices()
	for _, name := range desktops {
		var l *Lease
		s.st.view(func(tx *catalog.Tx) error {
			l, _ = activeLease(tx, name)
			return nil
		})
		mark := leaseMark(l, s.now())
		var bound []string
		for _, d := range devs {
			if d.Bound(name) {
				bound = append(bound, d.Name)
			}
		}
		d, err := s.store.Desktop(name)
		if err != nil {
			continue
		}
		if d.Lease == mark && slices.Equal(d.Devices, bound) {
			continue
		}
		_, err = s.store.UpdateDesktop(nil, name, func(d *images.Desktop) error {
			d.Lease, d.Devices = mark, bound
			return nil
		})
		if err != nil {
			s.log.Warn("mark the lease in the catalog", "desktop", name, "err", err)
		}
	}
}

// markAll refreshes the marks of every desktop (at start, and now and then to
// clear expired leases).
func (s *Server) markAll() {
	ds, err := s.store.Desktops()
	if err != nil {
		return
	}
	var names []string
	for _, d := range ds {
		names = append(names, d.Name)
	}
	s.markCatalog(names...)
}
