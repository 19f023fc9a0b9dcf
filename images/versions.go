package images

import (
	"database/sql"
	"encoding/json"
	"fmt"
	"time"

	"github.com/cvd-project/cvd/catalog"
)

// A desktop's versions live in the catalog's versions table, one typed row each
// (see catalog/migrations); the desktop's record in the desktops bucket holds the
// rest (head, tops, pending switch). The functions here are the only ones that
// read or write that table.

const versionCols = "n, kind, checkin, created, system_layer, user_layer, from_n, device, bytes, note"

// scanVersion reads one row of versionCols.
func scanVersion(scan func(dest ...any) error) (Version, error) {
	var (
		v       Version
		kind    string
		checkin sql.NullString
	)
	if err := scan(&v.N, &kind, &checkin, &v.Created, &v.System, &v.User, &v.From, &v.Device, &v.Bytes, &v.Note); err != nil {
		return v, err
	}
	v.Kind, v.Checkin, v.Created = VersionKind(kind), checkin.String, v.Created.UTC()
	v.Conflict = v.Kind == VersionConflict
	return v, nil
}

// loadVersions reads a desktop's versions in order.
func loadVersions(tx *catalog.Tx, desktop string) ([]Version, error) {
	var out []Version
	err := tx.Query("SELECT "+versionCols+" FROM versions WHERE desktop = ? ORDER BY n", []any{desktop},
		func(scan func(dest ...any) error) error {
			v, err := scanVersion(scan)
			out = append(out, v)
			return err
		})
	if err != nil {
		return nil, fmt.Errorf("versions of %s: %w", desktop, err)
	}
	return out, nil
}

// loadAllVersions reads every desktop's versions, by desktop, in order.
func loadAllVersions(tx *catalog.Tx) (map[string][]Version, error) {
	out := map[string][]Version{}
	err := tx.Query("SELECT desktop, "+versionCols+" FROM versions ORDER BY desktop, n", nil,
		func(scan func(dest ...any) error) error {
			var name string
			v, err := scanVersion(func(dest ...any) error { return scan(append([]any{&name}, dest...)...) })
			out[name] = append(out[name], v)
			return err
		})
	if err != nil {
		return nil, fmt.Errorf("versions: %w", err)
	}
	return out, nil
}

// writeVersions makes the table's rows for a desktop the list want, given the
// rows it holds (stored): it writes only the versions that are new or changed,
// and deletes those no longer listed (a prune).
func writeVersions(tx *catalog.Tx, desktop string, stored, want []Version) error {
	have := make(map[int]Version, len(stored))
	for _, v := range stored {
		have[v.N] = v
	}
	for _, v := range want {
		v = normalVersion(v)
		if old, ok := have[v.N]; ok && normalVersion(old) == v {
			delete(have, v.N)
			continue
		}
		delete(have, v.N)
		var checkin any
		if v.Checkin != "" {
			checkin = v.Checkin
		}
		_, err := tx.Exec("INSERT INTO versions (desktop, "+versionCols+") VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"+
			" ON CONFLICT (desktop, n) DO UPDATE SET kind = excluded.kind, checkin = excluded.checkin,"+
			" created = excluded.created, system_layer = excluded.system_layer, user_layer = excluded.user_layer,"+
			" from_n = excluded.from_n, device = excluded.device, bytes = excluded.bytes, note = excluded.note",
			desktop, v.N, string(v.Kind), checkin, v.Created, v.System, v.User, v.From, v.Device, v.Bytes, v.Note)
		if err != nil {
			return fmt.Errorf("version %d of %s: %w", v.N, desktop, err)
		}
	}
	for n := range have {
		if _, err := tx.Exec("DELETE FROM versions WHERE desktop = ? AND n = ?", desktop, n); err != nil {
			return fmt.Errorf("version %d of %s: %w", n, desktop, err)
		}
	}
	return nil
}

// normalVersion is v as the table gives it back: a kind (from the note for a
// version recorded before versions carried one; a conflict flag makes it a
// conflict), the time in UTC to the second.
func normalVersion(v Version) Version {
	if v.Kind == "" {
		v.Kind = kindFromNote(v.Note)
	}
	if v.Conflict && v.Kind == VersionCheckin {
		v.Kind = VersionConflict
	}
	v.Conflict = v.Kind == VersionConflict
	if v.Kind != VersionCheckin && v.Kind != VersionConflict && v.Kind != VersionSnapshot {
		v.Checkin = ""
	}
	v.Created = v.Created.UTC().Truncate(time.Second)
	return v
}

// desktopRecord is a desktop's record in the desktops bucket: the desktop
// without its versions. A record written before the versions table lists them
// (legacy); it is rewritten without them when the store moves them.
func readDesktop(tx *catalog.Tx, name string) (d *Desktop, legacy bool, err error) {
	d = &Desktop{}
	ok, err := getJSON(tx.Bucket(bucketDesktops), name, d)
	if err != nil {
		return nil, false, err
	}
	if !ok {
		return nil, false, fmt.Errorf("desktop %s: %w", name, ErrNotFound)
	}
	d.Devices, d.Lease, d.LeaseEpoch = nil, "", 0 // not part of the record (see fillHolders)
	if len(d.Versions) > 0 {
		for i := range d.Versions {
			d.Versions[i] = normalVersion(d.Versions[i])
		}
		return d, true, nil
	}
	d.Versions, err = loadVersions(tx, name)
	return d, false, err
}

// putDesktop writes a desktop's record and its versions, given the versions the
// table holds for it now (nil for a new desktop or a legacy record).
func putDesktop(tx *catalog.Tx, d *Desktop, stored []Version) error {
	if err := writeVersions(tx, d.Name, stored, d.Versions); err != nil {
		return err
	}
	rec := *d
	rec.Versions, rec.Devices, rec.Lease, rec.LeaseEpoch = nil, nil, "", 0
	raw, err := json.Marshal(&rec)
	if err != nil {
		return err
	}
	return tx.Bucket(bucketDesktops).Put([]byte(d.Name), raw)
}

// deleteDesktop removes a desktop's record and its versions.
func deleteDesktop(tx *catalog.Tx, name string) error {
	if _, err := tx.Exec("DELETE FROM versions WHERE desktop = ?", name); err != nil {
		return err
	}
	return tx.Bucket(bucketDesktops).Delete([]byte(name))
}

// moveVersions moves the versions that desktop records still list into the
// versions table (a store made before it, or a bbolt store's records just
// migrated), rewriting each record without them, in one transaction.
func moveVersions(tx *catalog.Tx) (int, error) {
	var names []string
	err := tx.Bucket(bucketDesktops).ForEach(func(k, v []byte) error {
		var rec struct {
			Versions []json.RawMessage `json:"versions"`
		}
		if json.Unmarshal(v, &rec) == nil && len(rec.Versions) > 0 {
			names = append(names, string(k))
		}
		return nil
	})
	if err != nil {
		return 0, err
	}
	for _, name := range names {
		d, legacy, err := readDesktop(tx, name)
		if err != nil {
			return 0, err
		}
		if !legacy {
			continue
		}
		stored, err := loadVersions(tx, name)
		if err != nil {
			return 0, err
		}
		if err := putDesktop(tx, d, stored); err != nil {
			return 0, err
		}
	}
	return len(names), nil
}

// fillHolders gives desktops (all of them when name is "", else the one called
// name) the devices bound to them, the epoch of the active lease, and that
// lease's holder while it is unexpired at now, from
// the devices, device_desktops and leases tables that syncd writes.
func fillHolders(tx *catalog.Tx, ds []*Desktop, name string, now time.Time) error {
	at := map[string]*Desktop{}
	for _, d := range ds {
		d.Devices, d.Lease, d.LeaseEpoch = nil, "", 0
		at[d.Name] = d
	}
	where, args := "", []any(nil)
	if name != "" {
		where, args = " AND desktop = ?", []any{name}
	}
	err := tx.Query("SELECT desktop, device_name, expires, epoch FROM leases WHERE state = 'active'"+where, args,
		func(scan func(dest ...any) error) error {
			var desk, dev string
			var exp time.Time
			var epoch int64
			if err := scan(&desk, &dev, &exp, &epoch); err != nil {
				return err
			}
			if d := at[desk]; d != nil {
				d.LeaseEpoch = epoch
				if exp.After(now) {
					d.Lease = dev + " until " + exp.UTC().Format(time.RFC3339)
				}
			}
			return nil
		})
	if err != nil {
		return err
	}
	where, args = "", nil
	if name != "" {
		where, args = " WHERE b.desktop = ?", []any{name}
	}
	return tx.Query("SELECT b.desktop, v.name FROM device_desktops b JOIN devices v ON v.id = b.device"+where+" ORDER BY v.name", args,
		func(scan func(dest ...any) error) error {
			var desk, dev string
			if err := scan(&desk, &dev); err != nil {
				return err
			}
			if d := at[desk]; d != nil {
				d.Devices = append(d.Devices, dev)
			}
			return nil
		})
}
