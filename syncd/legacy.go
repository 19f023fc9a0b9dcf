package syncd

import (
	"encoding/json"
	"fmt"
	"sort"

	"github.com/cvd-project/cvd/catalog"
	"github.com/cvd-project/cvd/images"
	"github.com/cvd-project/cvd/syncd/proto"
)

// Records an earlier layout kept as JSON documents in the catalog's key-value
// buckets (a bbolt syncd.db's buckets, migrated with the prefix
// images.LegacySyncPrefix): the devices with their names, and the leases (the
// active one of each desktop, and the log of all).
var (
	bucketDevices  = []byte(images.LegacySyncPrefix + "devices")  // device id → Device
	bucketDevNames = []byte(images.LegacySyncPrefix + "devnames") // device name → device id
	bucketLeases   = []byte(images.LegacySyncPrefix + "leases")   // desktop → Lease (the active one)
	bucketLeaseLog = []byte(images.LegacySyncPrefix + "leaselog") // lease id → Lease with its end state
)

func init() { images.RegisterRecordMover("devices and leases", moveLegacyRecords) }

// moveLegacyRecords moves the legacy devices and leases into their tables and
// deletes the documents. A lease gets the epoch of its order among its desktop's
// leases (by grant time); an active lease is the one the leases bucket holds.
func moveLegacyRecords(tx *catalog.Tx) (int, error) {
	moved := 0
	err := tx.Bucket(bucketDevices).ForEach(func(k, v []byte) error {
		var d Device
		if err := json.Unmarshal(v, &d); err != nil {
			return fmt.Errorf("device %s: %w", k, err)
		}
		if old, err := oneDevice(tx, "id = ? OR name = ?", d.ID, d.Name); err != nil || old != nil {
			return err
		}
		if err := insertDevice(tx, &d); err != nil {
			return fmt.Errorf("device %s: %w", d.Name, err)
		}
		moved++
		return bind(tx, d.ID, d.Desktops, "")
	})
	if err != nil {
		return 0, err
	}
	leases := map[string]*proto.Lease{}
	load := func(b []byte, active bool) error {
		return tx.Bucket(b).ForEach(func(k, v []byte) error {
			var l proto.Lease
			if err := json.Unmarshal(v, &l); err != nil {
				return fmt.Errorf("lease %s: %w", k, err)
			}
			if active {
				l.State = "active"
			} else if l.State == "active" || l.State == "" {
				l.State, l.Ended = "expired", l.Expires // the log's copy of a lease since replaced
			}
			if prev := leases[l.ID]; prev == nil || active {
				leases[l.ID] = &l
			}
			return nil
		})
	}
	if err := load(bucketLeaseLog, false); err != nil {
		return 0, err
	}
	if err := load(bucketLeases, true); err != nil {
		return 0, err
	}
	byDesktop := map[string][]*proto.Lease{}
	for _, l := range leases {
		byDesktop[l.Desktop] = append(byDesktop[l.Desktop], l)
	}
	for desktop, ls := range byDesktop {
		sort.Slice(ls, func(i, j int) bool {
			if !ls[i].Granted.Equal(ls[j].Granted) {
				return ls[i].Granted.Before(ls[j].Granted)
			}
			return ls[i].ID < ls[j].ID
		})
		var epoch int64
		err := tx.Query("SELECT COALESCE(MAX(epoch), 0) FROM leases WHERE desktop = ?", []any{desktop},
			func(scan func(dest ...any) error) error { return scan(&epoch) })
		if err != nil {
			return 0, err
		}
		for _, l := range ls {
			if old, err := oneLease(tx, "id = ?", l.ID); err != nil {
				return 0, err
			} else if old != nil {
				continue
			}
			epoch++
			l.Epoch = epoch
			if err := putLease(tx, l); err != nil {
				return 0, err
			}
			moved++
		}
	}
	_, err = tx.Exec("DELETE FROM kv WHERE b IN (?, ?, ?, ?)",
		string(bucketDevices), string(bucketDevNames), string(bucketLeases), string(bucketLeaseLog))
	return moved, err
}
