package images

import (
	"fmt"
	"os"
	"sort"
	"strings"
	"time"

	bolt "go.etcd.io/bbolt"
)

// Clone is the record of a linked clone. Package clone makes them.
type Clone struct {
	Name     string `json:"name"`
	UUID     string `json:"uuid"`
	MAC      string `json:"mac"`
	Hostname string `json:"hostname"`
	// Desktop and Version say which desktop version it was made from ("" and 0 for
	// a clone of a layer).
	Desktop string `json:"desktop,omitempty"`
	Version int    `json:"version,omitempty"`
	// Layer is the sealed layer its system disk stands on; UserLayer the one its
	// user disk stands on ("" for a blank user disk or none).
	Layer     string `json:"layer"`
	UserLayer string `json:"user_layer,omitempty"`
	// Store-relative paths of its writable tops and seed image.
	Disk     string    `json:"disk"`
	UserDisk string    `json:"user_disk,omitempty"`
	Seed     string    `json:"seed,omitempty"`
	Created  time.Time `json:"created"`
}

// CloneFiles are the store-relative paths of a clone's system top, user top and
// seed image.
func CloneFiles(name string) (system, user, seed string) {
	p := ClonesDir + "/" + name
	return p + ".qcow2", p + ".user.qcow2", p + ".seed.iso"
}

// CloneSource is what a clone stands on.
type CloneSource struct {
	Desktop   string `json:"desktop,omitempty"`
	Version   int    `json:"version,omitempty"`
	Layer     string `json:"layer"`
	UserLayer string `json:"user_layer,omitempty"`
	// UserSize > 0 with no UserLayer: the clone gets a blank user disk.
	UserSize int64 `json:"user_size,omitempty"`
	// HasUser: the clone gets a user disk.
	HasUser bool `json:"has_user,omitempty"`
}

// ResolveCloneSource turns a desktop name or a layer reference into what a clone
// stands on: for a desktop, the layers of its head version.
func (s *Store) ResolveCloneSource(ref string) (*CloneSource, error) {
	var src *CloneSource
	err := s.db.View(func(tx *bolt.Tx) error {
		if d, err := getDesktop(tx, ref); err == nil {
			v := d.HeadVersion()
			if v == nil {
				return fmt.Errorf("desktop %s: head version %d: %w", ref, d.Head, ErrNotFound)
			}
			src = &CloneSource{Desktop: d.Name, Version: v.N, Layer: v.System, UserLayer: v.User,
				HasUser: d.UserDisk != ""}
			if v.User == "" {
				src.UserSize = d.UserSize
			}
			return nil
		}
		id, err := resolveTx(tx, ref)
		if err != nil {
			return fmt.Errorf("%s is neither a desktop nor a layer: %w", ref, err)
		}
		src = &CloneSource{Layer: id}
		return nil
	})
	return src, err
}

// CloneNamesFree checks that no clone has any of names and that none of their
// files exist, and returns the MACs in use.
func (s *Store) CloneNamesFree(names []string) (usedMACs map[string]bool, err error) {
	usedMACs = map[string]bool{}
	err = s.db.View(func(tx *bolt.Tx) error {
		b := tx.Bucket(bucketClones)
		for _, n := range names {
			if err := CheckObjectName("clone", n); err != nil {
				return err
			}
			if b.Get([]byte(n)) != nil {
				return fmt.Errorf("clone %s: %w", n, ErrExists)
			}
		}
		return tx.Bucket(bucketMACs).ForEach(func(k, v []byte) error {
			usedMACs[string(k)] = true
			return nil
		})
	})
	if err != nil {
		return nil, err
	}
	for _, n := range names {
		a, b, c := CloneFiles(n)
		for _, f := range []string{a, b, c} {
			if _, err := os.Lstat(s.Path(f)); err == nil {
				return nil, fmt.Errorf("clone %s: %s exists without a record (see `cvd store check`)", n, f)
			}
		}
	}
	return usedMACs, nil
}

// CommitClones records clones whose files p journaled, in one transaction that
// also ends p. Names and MACs are checked again; on error nothing is recorded and
// the caller should Abort p.
func (s *Store) CommitClones(p *Pending, clones []Clone) error {
	return p.commit(func(tx *bolt.Tx) error {
		cb, mb, rb := tx.Bucket(bucketClones), tx.Bucket(bucketMACs), tx.Bucket(bucketRefs)
		for i := range clones {
			c := &clones[i]
			if err := CheckObjectName("clone", c.Name); err != nil {
				return err
			}
			if cb.Get([]byte(c.Name)) != nil {
				return fmt.Errorf("clone %s: %w", c.Name, ErrExists)
			}
			mac := strings.ToLower(c.MAC)
			if old := mb.Get([]byte(mac)); old != nil {
				return fmt.Errorf("MAC %s of clone %s: %w (clone %s)", mac, c.Name, ErrExists, old)
			}
			for _, id := range []string{c.Layer, c.UserLayer} {
				if id == "" {
					continue
				}
				if getLayer(tx, id) == nil {
					return fmt.Errorf("layer %s: %w", shortID(id), ErrNotFound)
				}
				if err := rb.Put(refKey(id, "clone", c.Name), nil); err != nil {
					return err
				}
			}
			if c.Desktop != "" && tx.Bucket(bucketDesktops).Get([]byte(c.Desktop)) == nil {
				return fmt.Errorf("desktop %s: %w", c.Desktop, ErrNotFound)
			}
			if err := mb.Put([]byte(mac), []byte(c.Name)); err != nil {
				return err
			}
			if err := putJSON(cb, c.Name, c); err != nil {
				return err
			}
		}
		return nil
	})
}

// Clones lists the clones by name.
func (s *Store) Clones() ([]Clone, error) {
	var out []Clone
	err := s.db.View(func(tx *bolt.Tx) error {
		return tx.Bucket(bucketClones).ForEach(func(k, v []byte) error {
			var c Clone
			if _, err := getJSON(tx.Bucket(bucketClones), string(k), &c); err != nil {
				return err
			}
			out = append(out, c)
			return nil
		})
	})
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out, err
}

// Clone returns the clone called name.
func (s *Store) Clone(name string) (*Clone, error) {
	var c Clone
	err := s.db.View(func(tx *bolt.Tx) error {
		ok, err := getJSON(tx.Bucket(bucketClones), name, &c)
		if err == nil && !ok {
			err = fmt.Errorf("clone %s: %w", name, ErrNotFound)
		}
		return err
	})
	if err != nil {
		return nil, err
	}
	return &c, nil
}

// RemoveClones removes clones and their files. It never touches a layer.
func (s *Store) RemoveClones(names []string) ([]Clone, error) {
	var gone []Clone
	err := s.removeJournaled("clone rm", func(tx *bolt.Tx) ([]string, error) {
		var files []string
		for _, n := range names {
			var c Clone
			ok, err := getJSON(tx.Bucket(bucketClones), n, &c)
			if err != nil {
				return nil, err
			}
			if !ok {
				return nil, fmt.Errorf("clone %s: %w", n, ErrNotFound)
			}
			f, err := deleteCloneTx(tx, n)
			if err != nil {
				return nil, err
			}
			files = append(files, f...)
			gone = append(gone, c)
		}
		return files, nil
	})
	if err != nil {
		return nil, err
	}
	return gone, nil
}

// deleteCloneTx deletes a clone's record, MAC and refs, and returns its files.
func deleteCloneTx(tx *bolt.Tx, name string) ([]string, error) {
	var c Clone
	ok, err := getJSON(tx.Bucket(bucketClones), name, &c)
	if err != nil || !ok {
		return nil, err
	}
	for _, id := range []string{c.Layer, c.UserLayer} {
		if id != "" {
			if err := tx.Bucket(bucketRefs).Delete(refKey(id, "clone", name)); err != nil {
				return nil, err
			}
		}
	}
	if err := tx.Bucket(bucketMACs).Delete([]byte(strings.ToLower(c.MAC))); err != nil {
		return nil, err
	}
	files := []string{c.Disk}
	if c.UserDisk != "" {
		files = append(files, c.UserDisk)
	}
	if c.Seed != "" {
		files = append(files, c.Seed)
	}
	return files, tx.Bucket(bucketClones).Delete([]byte(name))
}
