package syncd

import (
	"fmt"
	"time"

	"github.com/cvd-project/cvd/images"
	bolt "go.etcd.io/bbolt"
)

// Version is one state of a desktop: the sealed layers its disks stand on.
type Version struct {
	N       int       `json:"n"`
	Created time.Time `json:"created"`
	System  string    `json:"system"`
	User    string    `json:"user,omitempty"`
	Note    string    `json:"note,omitempty"` // create, check-out seal, check-in, conflict, rollback to N, ...
	// From is the version this one was made from; a check-in's base version.
	From int `json:"from,omitempty"`
	// Conflict marks a check-in that did not start from the head: it is kept
	// beside the head, which did not move.
	Conflict bool   `json:"conflict,omitempty"`
	Device   string `json:"device,omitempty"` // device name for check-ins
	// Bytes is the payload a check-in moved (cluster data as sent).
	Bytes int64 `json:"bytes,omitempty"`
}

// DesktopVersions is a desktop's history as sync keeps it: seeded from the images
// catalog's record the first time sync touches the desktop, then extended by
// check-out seals, check-ins and rollbacks (see .cache/requests-syncd.md, item 1).
type DesktopVersions struct {
	Name     string    `json:"name"`
	Head     int       `json:"head"`
	Versions []Version `json:"versions"`
	// Disks of the desktop in the images catalog (store-relative tops).
	SystemDisk string `json:"system_disk"`
	UserDisk   string `json:"user_disk,omitempty"`
	UserSize   int64  `json:"user_size,omitempty"` // blank user disk size when no user layer
}

// HeadVersion is the version Head names.
func (d *DesktopVersions) HeadVersion() *Version { return d.Version(d.Head) }

// Version returns version n, or nil.
func (d *DesktopVersions) Version(n int) *Version {
	for i := range d.Versions {
		if d.Versions[i].N == n {
			return &d.Versions[i]
		}
	}
	return nil
}

func (d *DesktopVersions) next() int {
	n := 0
	for _, v := range d.Versions {
		n = max(n, v.N)
	}
	return n + 1
}

// desktopVersions loads the desktop's versions, seeding them from the catalog.
func desktopVersions(tx *bolt.Tx, store *images.Store, name string) (*DesktopVersions, error) {
	var dv DesktopVersions
	ok, err := getJSON(tx, bucketVersions, name, &dv)
	if err != nil {
		return nil, err
	}
	if ok {
		return &dv, nil
	}
	d, err := store.Desktop(name)
	if err != nil {
		return nil, err
	}
	dv = DesktopVersions{Name: d.Name, Head: d.Head, SystemDisk: d.SystemDisk, UserDisk: d.UserDisk, UserSize: d.UserSize}
	for _, v := range d.Versions {
		dv.Versions = append(dv.Versions, Version{N: v.N, Created: v.Created, System: v.System, User: v.User, Note: v.Note})
	}
	if dv.HeadVersion() == nil {
		return nil, fmt.Errorf("desktop %s: head version %d is missing", name, d.Head)
	}
	return &dv, nil
}

func putVersions(tx *bolt.Tx, dv *DesktopVersions) error {
	return putJSON(tx, bucketVersions, dv.Name, dv)
}
