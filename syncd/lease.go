package syncd

import (
	"crypto/rand"
	"database/sql"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"time"

	"github.com/cvd-project/cvd/syncd/state"

	"github.com/cvd-project/cvd/catalog"
	"github.com/cvd-project/cvd/images"
	"github.com/cvd-project/cvd/syncd/proto"
)

func newLeaseID() string {
	b := make([]byte, 12)
	if _, err := rand.Read(b); err != nil {
		panic(err)
	}
	return hex.EncodeToString(b)
}

// The leases live in the catalog's leases table (one row per lease granted; see
// catalog/migrations): the functions below are the only ones that touch it.

const leaseCols = "id, desktop, epoch, device, device_name, granted, expires, version, state, ended, handover_to, handover_at"

// leaseTime is t as the catalog keeps it (UTC, to the microsecond: PostgreSQL's
// precision), so that a lease read back compares equal to the one written.
func leaseTime(t time.Time) time.Time { return t.UTC().Truncate(time.Microsecond) }

// queryLeases reads the leases that match where (SQL, "?" placeholders).
func queryLeases(tx *catalog.Tx, where string, args ...any) ([]proto.Lease, error) {
	var out []proto.Lease
	err := tx.Query("SELECT "+leaseCols+" FROM leases WHERE "+where+" ORDER BY desktop, epoch", args,
		func(scan func(dest ...any) error) error {
			var (
				l         proto.Lease
				ended, ho sql.NullTime
			)
			if err := scan(&l.ID, &l.Desktop, &l.Epoch, &l.Device, &l.DeviceName, &l.Granted, &l.Expires, &l.Version, &l.State, &ended,
				&l.HandoverTo, &ho); err != nil {
				return err
			}
			l.Granted, l.Expires = l.Granted.UTC(), l.Expires.UTC()
			if ended.Valid {
				l.Ended = ended.Time.UTC()
			}
			if ho.Valid {
				l.HandoverAt = ho.Time.UTC()
			}
			out = append(out, l)
			return nil
		})
	return out, err
}

func oneLease(tx *catalog.Tx, where string, args ...any) (*proto.Lease, error) {
	ls, err := queryLeases(tx, where, args...)
	if err != nil || len(ls) == 0 {
		return nil, err
	}
	return &ls[0], nil
}

// activeLease is the desktop's active lease (expired or not), or nil.
func activeLease(tx *catalog.Tx, desktop string) (*proto.Lease, error) {
	return oneLease(tx, "desktop = ? AND state = 'active'", desktop)
}

// putLease writes l (a new lease, or a change of its expiry, version or state).
func putLease(tx *catalog.Tx, l *proto.Lease) error {
	var ended, ho any
	if !l.Ended.IsZero() {
		ended = leaseTime(l.Ended)
	}
	if !l.HandoverAt.IsZero() {
		ho = leaseTime(l.HandoverAt)
	}
	_, err := tx.Exec("INSERT INTO leases ("+leaseCols+") VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"+
		" ON CONFLICT (id) DO UPDATE SET expires = excluded.expires, version = excluded.version,"+
		" state = excluded.state, ended = excluded.ended, handover_to = excluded.handover_to, handover_at = excluded.handover_at",
		l.ID, l.Desktop, l.Epoch, l.Device, l.DeviceName, leaseTime(l.Granted), leaseTime(l.Expires), l.Version, l.State, ended,
		l.HandoverTo, ho)
	if err != nil {
		return fmt.Errorf("lease of %s: %w", l.Desktop, err)
	}
	return nil
}

// CheckNotHeld refuses (a *LeaseError wrapping ErrLeaseHeld, naming the holder)
// when a device holds an unexpired lease on the desktop in the store: the
// desktop is out on that device and must not be removed under it.
func CheckNotHeld(store *images.Store, desktop string, now time.Time) error {
	var l *proto.Lease
	err := store.Catalog().View(func(tx *catalog.Tx) error {
		var err error
		l, err = activeLease(tx, desktop)
		return err
	})
	if err != nil || l == nil || l.Expired(now) {
		return err
	}
	return leaseHeld(l, proto.ErrLeaseHeld)
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
		return tx.Bucket(state.BucketSessions).ForEach(func(k, v []byte) error {
			var se Session
			if err := json.Unmarshal(v, &se); err != nil {
				return fmt.Errorf("check-in %s: %w", k, err)
			}
			if se.Desktop == desktop && se.State == proto.SessionReceiving {
				out = append(out, se.Base)
			}
			return nil
		})
	})
	return out, err
}

// endLease ends the active lease l with its end state.
func endLease(tx *catalog.Tx, l *proto.Lease, st string, now time.Time) error {
	l.State, l.Ended = st, leaseTime(now)
	if err := tx.Bucket(state.BucketHaves).Delete([]byte(l.ID)); err != nil {
		return err
	}
	return putLease(tx, l)
}

func leaseHeld(l *proto.Lease, err error) error {
	return &proto.LeaseError{Desktop: l.Desktop, Holder: l.DeviceName, Expires: l.Expires.UTC().Format(time.RFC3339), Err: err}
}

// grantLease gives dev the lease on desktop for ttl, or renews the one it holds.
// Another device's unexpired lease refuses it with a *LeaseError.
func grantLease(tx *catalog.Tx, desktop string, dev *Device, ttl time.Duration, version int, now time.Time) (*proto.Lease, bool, error) {
	l, err := activeLease(tx, desktop)
	if err != nil {
		return nil, false, err
	}
	if l != nil {
		switch {
		case l.Device != dev.ID && !l.Expired(now):
			return nil, false, leaseHeld(l, proto.ErrLeaseHeld)
		case l.Device == dev.ID && !l.Expired(now):
			l.Expires = leaseTime(now.Add(ttl))
			l.Version = version
			return l, false, putLease(tx, l)
		default:
			if err := endLease(tx, l, "expired", now); err != nil {
				return nil, false, err
			}
		}
	}
	// The new lease's epoch follows every earlier lease of the desktop.
	var epoch int64
	err = tx.Query("SELECT COALESCE(MAX(epoch), 0) + 1 FROM leases WHERE desktop = ?", []any{desktop},
		func(scan func(dest ...any) error) error { return scan(&epoch) })
	if err != nil {
		return nil, false, err
	}
	nl := &proto.Lease{ID: newLeaseID(), Desktop: desktop, Epoch: epoch, Device: dev.ID, DeviceName: dev.Name,
		Granted: leaseTime(now), Expires: leaseTime(now.Add(ttl)), Version: version, State: "active"}
	return nl, true, putLease(tx, nl)
}

// ownLease returns dev's active, unexpired lease on desktop with ID id.
func ownLease(tx *catalog.Tx, desktop string, dev *Device, id string, now time.Time) (*proto.Lease, error) {
	l, err := activeLease(tx, desktop)
	if err != nil {
		return nil, err
	}
	if l != nil && l.ID == id && l.Device == dev.ID {
		if l.Expired(now) {
			return nil, fmt.Errorf("desktop %s: %w at %s: check it out again", desktop, proto.ErrLeaseExpired, l.Expires.Format(time.RFC3339))
		}
		return l, nil
	}
	old, err := oneLease(tx, "id = ?", id)
	if err != nil {
		return nil, err
	} else if old != nil && old.Device == dev.ID && old.Desktop == desktop {
		switch old.State {
		case "expired":
			return nil, fmt.Errorf("desktop %s: %w at %s: check it out again", desktop, proto.ErrLeaseExpired, old.Expires.Format(time.RFC3339))
		case "broken":
			return old, fmt.Errorf("desktop %s: %w: the lease was broken by an administrator", desktop, proto.ErrNoLease)
		default:
			return nil, fmt.Errorf("desktop %s: %w: the lease was %s", desktop, proto.ErrNoLease, old.State)
		}
	}
	if l != nil && l.Device != dev.ID && !l.Expired(now) {
		return nil, leaseHeld(l, proto.ErrLeaseHeld)
	}
	return nil, fmt.Errorf("desktop %s: %w held by this device", desktop, proto.ErrNoLease)
}
