package syncd

import (
	"errors"
	"fmt"
	"slices"
	"strings"

	"github.com/cvd-project/cvd/syncd/state"

	"github.com/cvd-project/cvd/catalog"
	"github.com/cvd-project/cvd/desktop"
	"github.com/cvd-project/cvd/images"
	"github.com/cvd-project/cvd/syncd/proto"
)

// DesktopVersions is a desktop's history and disks as sync uses them.
type DesktopVersions struct {
	Name     string          `json:"name"`
	Head     int             `json:"head"`
	Versions []proto.Version `json:"versions"`
	// Disks of the desktop (store-relative tops).
	SystemDisk string `json:"system_disk"`
	UserDisk   string `json:"user_disk,omitempty"`
	UserSize   int64  `json:"user_size,omitempty"` // blank user disk size when no user layer
	// Boot is how the desktop boots (nil: from its system disk).
	Boot *images.DesktopBoot `json:"boot,omitempty"`
}

func versionsOf(d *images.Desktop) *DesktopVersions {
	return &DesktopVersions{Name: d.Name, Head: d.Head, Versions: slices.Clone(d.Versions),
		SystemDisk: d.SystemDisk, UserDisk: d.UserDisk, UserSize: d.UserSize, Boot: d.Boot}
}

// HeadVersion is the version Head names.
func (d *DesktopVersions) HeadVersion() *proto.Version { return d.Version(d.Head) }

// Version returns version n, or nil.
func (d *DesktopVersions) Version(n int) *proto.Version {
	for i := range d.Versions {
		if d.Versions[i].N == n {
			return &d.Versions[i]
		}
	}
	return nil
}

// desktopVersions reads a desktop's versions from the catalog.
func desktopVersions(store *images.Store, name string) (*DesktopVersions, error) {
	d, err := store.Desktop(name)
	if err != nil {
		return nil, err
	}
	dv := versionsOf(d)
	if dv.HeadVersion() == nil {
		return nil, fmt.Errorf("desktop %s: head version %d is missing", name, d.Head)
	}
	return dv, nil
}

// addVersion adds v to the desktop's versions through desktop.AddVersion (which
// keeps a check-in that no longer starts from the head as a conflict) and returns
// the desktop as it is afterwards and the version added. fence is the epoch of
// the lease a check-in was made under (0 for none).
func addVersion(store *images.Store, name string, v proto.Version, setHead bool, fence int64, push *desktop.Push) (*DesktopVersions, *proto.Version, error) {
	d, added, err := desktop.AddPush(store, name, v, setHead, fence, push)
	if err != nil {
		return nil, nil, proto.NoSpace(err)
	}
	return versionsOf(d), &added, nil
}

// checkinVersion finds the version a check-in made (by its Checkin ID; versions
// of releases that kept the ID only in the note are found by the note).
func (d *DesktopVersions) checkinVersion(id string) *proto.Version {
	for i := range d.Versions {
		v := &d.Versions[i]
		if v.Checkin == id {
			return v
		}
		if v.Checkin == "" && (v.Note == desktop.CheckinNote(images.VersionCheckin, id) || v.Note == desktop.CheckinNote(images.VersionConflict, id)) {
			return v
		}
	}
	return nil
}

// migrateVersions moves versions an earlier syncd kept in its own state into the
// catalog (once; before images recorded sync's versions itself).
func (s *Server) migrateVersions() error {
	type old struct {
		Head     int             `json:"head"`
		Versions []proto.Version `json:"versions"`
	}
	var names []string
	olds := map[string]old{}
	err := s.st.View(func(tx *catalog.Tx) error {
		return tx.Bucket(state.BucketVersions).ForEach(func(k, v []byte) error {
			var o old
			if _, err := state.GetJSON(tx, state.BucketVersions, string(k), &o); err != nil {
				return err
			}
			names = append(names, string(k))
			olds[string(k)] = o
			return nil
		})
	})
	if err != nil || len(names) == 0 {
		return err
	}
	for _, name := range names {
		o := olds[name]
		err := desktop.MergeVersions(s.store, name, o.Versions, o.Head)
		if err != nil && !errors.Is(err, images.ErrNotFound) {
			s.log.Warn("could not move sync's versions into the catalog; they stay in the sync.versions bucket", "desktop", name, "err", err)
			continue
		}
		s.log.Info("moved sync's versions into the catalog", "desktop", name, "versions", len(o.Versions))
		if err := s.st.Update(func(tx *catalog.Tx) error { return tx.Bucket(state.BucketVersions).Delete([]byte(name)) }); err != nil {
			return err
		}
	}
	return nil
}

// isCheckin reports a version a check-in made.
func isCheckin(v *proto.Version) bool {
	return strings.HasPrefix(v.Note, "check-in ") || strings.HasPrefix(v.Note, "conflict ")
}
