package images

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"slices"
	"sort"
	"strings"
	"time"

	"github.com/cvd-project/cvd/catalog"
)

// Clone is the record of a linked clone. Package clone makes them.
type Clone struct {
	Name     string `json:"name"`
	UUID     string `json:"uuid"`
	MAC      string `json:"mac"`
	Hostname string `json:"hostname"`
	// MachineID is what the clone's /etc/machine-id holds, written into its own
	// top when the source's file system had one ("" when it had none: the
	// guest makes its own at its first boot).
	MachineID string `json:"machine_id,omitempty"`
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
	// Checkpoints are the former system tops that live checkpoints froze (cvd vm
	// checkpoint), oldest first, store-relative. They stay in the clones
	// directory, read-only: Disk stands on the last one, each stands on the one
	// before, and the first on Layer. UserCheckpoints are the same for UserDisk.
	Checkpoints     []string `json:"checkpoints,omitempty"`
	UserCheckpoints []string `json:"user_checkpoints,omitempty"`
	// Boot is how the clone boots under libvirt; nil boots from its disk with
	// the hypervisor's defaults.
	Boot *Boot `json:"boot,omitempty"`
}

// Boot says how a clone boots under libvirt (cvd provision, cvd vm start). Empty
// Kernel boots from the system disk (BIOS); a Kernel (absolute path) boots it
// directly with Initrd and Cmdline, as the tiny test guest does. Zero MemoryMiB
// or VCPUs take the hypervisor's defaults.
type Boot struct {
	Kernel    string `json:"kernel,omitempty"`
	Initrd    string `json:"initrd,omitempty"`
	Cmdline   string `json:"cmdline,omitempty"`
	MemoryMiB uint   `json:"memory_mib,omitempty"`
	VCPUs     uint   `json:"vcpus,omitempty"`
}

// SystemChainFiles are the store-relative files of the clone's system disk that
// are not sealed layers, top first: Disk, then its checkpoints newest first. The
// sealed chain of Layer follows them.
func (c *Clone) SystemChainFiles() []string {
	return append([]string{c.Disk}, reversed(c.Checkpoints)...)
}

// UserChainFiles is SystemChainFiles for the user disk (nil when there is none).
func (c *Clone) UserChainFiles() []string {
	if c.UserDisk == "" {
		return nil
	}
	return append([]string{c.UserDisk}, reversed(c.UserCheckpoints)...)
}

func reversed(s []string) []string {
	out := make([]string, len(s))
	for i, v := range s {
		out[len(s)-1-i] = v
	}
	return out
}

// CheckpointFile is the store-relative path of the top a clone's disk gets at
// its n-th live checkpoint (n >= 1): clones/NAME.cpN.qcow2, or
// clones/NAME.user.cpN.qcow2 for the user disk. Clone names hold no dots, so
// these never collide with another clone's files.
func CheckpointFile(name string, n int, user bool) string {
	p := ClonesDir + "/" + name
	if user {
		p += ".user"
	}
	return fmt.Sprintf("%s.cp%d.qcow2", p, n)
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
	err := s.db.View(func(tx *catalog.Tx) error {
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
	err = s.db.View(func(tx *catalog.Tx) error {
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
	return p.commit(func(tx *catalog.Tx) error {
		cb, mb, rb := tx.Bucket(bucketClones), tx.Bucket(bucketMACs), tx.Bucket(bucketRefs)
		// Clones of one call stand on a few layers and one desktop: each is
		// looked up once. A clone's record and its MAC are each one statement
		// that fails when the name or the MAC is taken.
		seen := map[string]bool{}
		exists := func(what string, b *catalog.Bucket, key string) bool {
			k := what + "\x00" + key
			if _, ok := seen[k]; !ok {
				seen[k] = b.Get([]byte(key)) != nil
			}
			return seen[k]
		}
		var refs, macs, recs []catalog.Record
		for i := range clones {
			c := &clones[i]
			if err := CheckObjectName("clone", c.Name); err != nil {
				return err
			}
			for _, id := range []string{c.Layer, c.UserLayer} {
				if id == "" {
					continue
				}
				if !exists("layer", tx.Bucket(bucketLayers), id) {
					return fmt.Errorf("layer %s: %w", shortID(id), ErrNotFound)
				}
				refs = append(refs, catalog.Record{K: refKey(id, "clone", c.Name)})
			}
			if c.Desktop != "" && !exists("desktop", tx.Bucket(bucketDesktops), c.Desktop) {
				return fmt.Errorf("desktop %s: %w", c.Desktop, ErrNotFound)
			}
			raw, err := json.Marshal(c)
			if err != nil {
				return err
			}
			macs = append(macs, catalog.Record{K: []byte(strings.ToLower(c.MAC)), V: []byte(c.Name)})
			recs = append(recs, catalog.Record{K: []byte(c.Name), V: raw})
		}
		// A few statements for the whole batch; a name or a MAC already taken
		// makes the batch write fewer rows, and the transaction is refused.
		if err := rb.PutAll(refs); err != nil {
			return err
		}
		if n, err := mb.PutAllIfAbsent(macs); err != nil {
			return err
		} else if n < len(macs) {
			for _, m := range macs {
				if owner := mb.Get(m.K); string(owner) != string(m.V) {
					return fmt.Errorf("MAC %s of clone %s: %w (clone %s)", m.K, m.V, ErrExists, owner)
				}
			}
			return fmt.Errorf("%w: a MAC given twice in one batch", ErrExists)
		}
		if n, err := cb.PutAllIfAbsent(recs); err != nil {
			return err
		} else if n < len(recs) {
			for _, r := range recs {
				if !bytes.Equal(cb.Get(r.K), r.V) {
					return fmt.Errorf("clone %s: %w", r.K, ErrExists)
				}
			}
			return fmt.Errorf("%w: a clone name given twice in one batch", ErrExists)
		}
		return nil
	})
}

// Clones lists the clones by name.
func (s *Store) Clones() ([]Clone, error) {
	var out []Clone
	err := s.db.View(func(tx *catalog.Tx) error {
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
	err := s.db.View(func(tx *catalog.Tx) error {
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
	err := s.removeJournaled("clone rm", func(tx *catalog.Tx) ([]string, error) {
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
func deleteCloneTx(tx *catalog.Tx, name string) ([]string, error) {
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
	files = append(files, c.Checkpoints...)
	files = append(files, c.UserCheckpoints...)
	if c.Seed != "" {
		files = append(files, c.Seed)
	}
	return files, tx.Bucket(bucketClones).Delete([]byte(name))
}

// RecordCheckpoint records a live checkpoint of clone name: its current system top
// is frozen (appended to Checkpoints) and newDisk, a store-relative file that must
// exist in the clones directory, becomes its top; newUserDisk does the same for
// the user disk ("" leaves it as it is). The files are not touched: the
// hypervisor made the new tops. It returns the updated record.
func (s *Store) RecordCheckpoint(name, newDisk, newUserDisk string) (*Clone, error) {
	if err := s.writable(); err != nil {
		return nil, err
	}
	var c Clone
	err := s.db.Update(func(tx *catalog.Tx) error {
		b := tx.Bucket(bucketClones)
		ok, err := getJSON(b, name, &c)
		if err != nil {
			return err
		}
		if !ok {
			return fmt.Errorf("clone %s: %w", name, ErrNotFound)
		}
		if newDisk == "" && newUserDisk == "" {
			return fmt.Errorf("%w: checkpoint of clone %s: no new top", ErrInvalid, name)
		}
		if newUserDisk != "" && c.UserDisk == "" {
			return fmt.Errorf("%w: checkpoint of clone %s: it has no user disk", ErrInvalid, name)
		}
		for _, f := range []string{newDisk, newUserDisk} {
			if f == "" {
				continue
			}
			if !strings.HasPrefix(f, ClonesDir+"/"+name+".") || strings.Contains(f[len(ClonesDir)+1:], "/") {
				return fmt.Errorf("%w: checkpoint of clone %s: new top %s is not one of its files in %s", ErrInvalid, name, f, ClonesDir)
			}
			if slices.Contains(c.Checkpoints, f) || slices.Contains(c.UserCheckpoints, f) || f == c.Disk || f == c.UserDisk {
				return fmt.Errorf("%w: checkpoint of clone %s: %s is already in its chain", ErrInvalid, name, f)
			}
			if _, err := os.Stat(s.Path(f)); err != nil {
				return fmt.Errorf("checkpoint of clone %s: new top: %w", name, err)
			}
		}
		if newDisk != "" {
			c.Checkpoints = append(c.Checkpoints, c.Disk)
			c.Disk = newDisk
		}
		if newUserDisk != "" {
			c.UserCheckpoints = append(c.UserCheckpoints, c.UserDisk)
			c.UserDisk = newUserDisk
		}
		return putJSON(b, name, &c)
	})
	if err != nil {
		return nil, err
	}
	return &c, nil
}

// SetCloneBoot records how the named clones boot (nil: from their disk, with
// the hypervisor's defaults), in one transaction.
func (s *Store) SetCloneBoot(boot *Boot, names ...string) error {
	if err := s.writable(); err != nil {
		return err
	}
	return s.db.Update(func(tx *catalog.Tx) error {
		b := tx.Bucket(bucketClones)
		for _, n := range names {
			var c Clone
			ok, err := getJSON(b, n, &c)
			if err != nil {
				return err
			}
			if !ok {
				return fmt.Errorf("clone %s: %w", n, ErrNotFound)
			}
			c.Boot = boot
			if err := putJSON(b, n, &c); err != nil {
				return err
			}
		}
		return nil
	})
}
