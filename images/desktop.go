package images

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"sort"
	"strings"
	"time"

	"github.com/cvd-project/cvd/catalog"
	"github.com/cvd-project/cvd/disk"
	"github.com/cvd-project/cvd/internal/fsutil"
)

// VersionKind says how a version was made.
type VersionKind string

// Version kinds.
const (
	VersionCreate    VersionKind = "create"    // the desktop's first version
	VersionSeal      VersionKind = "seal"      // the server's tops sealed (check-out, export, changes found at a check-in)
	VersionCheckin   VersionKind = "check-in"  // a device's check-in that moved the head
	VersionConflict  VersionKind = "conflict"  // a check-in kept beside the head
	VersionRollback  VersionKind = "rollback"  // the head moved back to an earlier version's layers
	VersionRecompose VersionKind = "recompose" // the desktop moved onto new base or app layers
	VersionSquash    VersionKind = "squash"    // a version whose layers a squash merged
	VersionImport    VersionKind = "import"    // a copy's version taken from a server or a bundle
	VersionSnapshot  VersionKind = "snapshot"  // a device's state as it became active, kept beside the head
	VersionMerge     VersionKind = "merge"     // two devices' user files merged (the seed's Table 1)
)

// kindFromNote gives the kind of a version recorded before versions carried one.
func kindFromNote(note string) VersionKind {
	for _, k := range []VersionKind{VersionCreate, VersionCheckin, VersionConflict, VersionRollback, VersionRecompose, VersionSquash, VersionImport, VersionSnapshot} {
		if strings.HasPrefix(note, string(k)) {
			return k
		}
	}
	if strings.HasPrefix(note, "check-out") && !strings.Contains(note, "seal") {
		return VersionImport
	}
	// The rest: the seals of the server's tops ("check-out seal", "server
	// changes before check-in", ...), the only other versions releases made.
	return VersionSeal
}

// Version is one state of a desktop: the sealed layers its disks stand on.
type Version struct {
	N       int       `json:"n"`
	Created time.Time `json:"created"`
	System  string    `json:"system"`         // layer the system disk stands on (top of base → apps)
	User    string    `json:"user,omitempty"` // layer the user disk stands on; "" for a blank user disk
	// Kind says how the version was made; Checkin is the ID of the check-in that
	// made it (check-in and conflict versions), so a commit retried after the
	// catalog took it finds it.
	Kind    VersionKind `json:"kind,omitempty"`
	Checkin string      `json:"checkin,omitempty"`
	Note    string      `json:"note,omitempty"` // free text: "check-out seal from 2", "recompose (keep)", ...
	// From is the version this one was made from (a check-in's starting point).
	From int `json:"from,omitempty"`
	// Conflict marks a check-in that did not start from the head: it is kept
	// beside the head, which it does not move.
	Conflict bool   `json:"conflict,omitempty"`
	Device   string `json:"device,omitempty"` // the device that made it ("" for the server)
	Bytes    int64  `json:"bytes,omitempty"`  // payload bytes a check-in moved
}

// PendingSwitch is a recompose planned for a desktop that was in use: it is
// applied before the desktop next starts.
type PendingSwitch struct {
	System    string    `json:"system"`    // the new system layer (kept by refs and gc)
	FromHead  int       `json:"from_head"` // the head it was planned on
	Policy    string    `json:"policy"`    // keep | refresh | force
	Requested time.Time `json:"requested"`
}

// Desktop is a named CVD.
type Desktop struct {
	Name     string    `json:"name"`
	Created  time.Time `json:"created"`
	Head     int       `json:"head"` // N of the current version
	Versions []Version `json:"versions"`
	// SystemDisk is the desktop's own delta, a writable top on the head's System
	// layer (store-relative path); "" for a desktop of a user disk alone.
	SystemDisk string `json:"system_disk"`
	// UserDisk is the writable top of the user disk ("" when it has none): on the
	// head's User layer, or a blank disk of UserSize bytes.
	UserDisk string `json:"user_disk,omitempty"`
	UserSize int64  `json:"user_size,omitempty"`
	// Devices (the devices bound to it) and Lease ("<device> until <expiry>"
	// while a device's lease is active and unexpired) are read from sync's
	// tables in the catalog with the desktop; they are not part of its record.
	Devices []string `json:"devices,omitempty"`
	Lease   string   `json:"lease,omitempty"`
	// LeaseEpoch is the epoch of the desktop's active lease (expired or not; 0
	// when none), read with the record in the same transaction: a check-in's
	// commit compares it with the lease it was made under.
	LeaseEpoch int64 `json:"lease_epoch,omitempty"`
	// Switch is a recompose waiting for the desktop's next start.
	Switch *PendingSwitch `json:"switch,omitempty"`
	// Boot is how the desktop boots on every device (nil: from its system
	// disk, with the defaults).
	Boot *DesktopBoot `json:"boot,omitempty"`
}

// layerRefs lists the layers a desktop record keeps: every version's layers and a
// pending switch's.
func (d *Desktop) layerRefs() []string {
	seen := map[string]bool{}
	var out []string
	add := func(id string) {
		if id != "" && !seen[id] {
			seen[id] = true
			out = append(out, id)
		}
	}
	for _, v := range d.Versions {
		add(v.System)
		add(v.User)
	}
	if d.Switch != nil {
		add(d.Switch.System)
	}
	return out
}

// HeadVersion is the version Head names.
func (d *Desktop) HeadVersion() *Version {
	for i := range d.Versions {
		if d.Versions[i].N == d.Head {
			return &d.Versions[i]
		}
	}
	return nil
}

// DesktopSpec says what a new desktop is made of.
type DesktopSpec struct {
	// Base is the base layer. It may be empty when Apps are given: it is then the
	// base of the first app's chain.
	Base string
	// Apps are app layers in order; each must have been captured on the one before
	// (the first on Base). Putting an app on another parent is a recompose.
	Apps []string
	// User is the layer the user disk stands on; when empty and UserSize > 0, the
	// user disk is a blank disk of UserSize bytes; with neither, there is none.
	User     string
	UserSize int64
	// UserOnly makes a desktop of a user disk alone (a device of the
	// desktop's group under the user policy: its own OS, the desktop's user
	// data): no Base, no Apps, no system disk.
	UserOnly bool
}

func desktopFiles(name string) (system, user string) {
	return DesktopsDir + "/" + name + ".system.qcow2", DesktopsDir + "/" + name + ".user.qcow2"
}

// CreateDesktop makes a desktop: its first version, and its own writable tops.
func (s *Store) CreateDesktop(ctx context.Context, name string, spec DesktopSpec) (*Desktop, error) {
	if err := s.writable(); err != nil {
		return nil, err
	}
	if err := CheckObjectName("desktop", name); err != nil {
		return nil, err
	}
	switch {
	case spec.UserOnly && (spec.Base != "" || len(spec.Apps) > 0 || (spec.User == "" && spec.UserSize == 0)):
		return nil, fmt.Errorf("%w: a desktop of a user disk alone has no base or apps and needs a user layer or size", ErrInvalid)
	case !spec.UserOnly && spec.Base == "" && len(spec.Apps) == 0:
		return nil, fmt.Errorf("%w: a desktop needs a base layer", ErrInvalid)
	}
	v := Version{N: 1, Created: s.now().UTC().Truncate(time.Second), Kind: VersionCreate, Note: "create"}
	err := s.db.View(func(tx *catalog.Tx) error {
		if tx.Bucket(bucketDesktops).Get([]byte(name)) != nil {
			return fmt.Errorf("desktop %s: %w", name, ErrExists)
		}
		var top *Layer
		if spec.Base != "" {
			id, err := resolveTx(tx, spec.Base)
			if err != nil {
				return fmt.Errorf("base: %w", err)
			}
			top = getLayer(tx, id)
			if top == nil || top.Kind != KindBase {
				return fmt.Errorf("%w: base %s is not a base layer", ErrInvalid, spec.Base)
			}
		}
		for _, a := range spec.Apps {
			id, err := resolveTx(tx, a)
			if err != nil {
				return fmt.Errorf("app: %w", err)
			}
			l := getLayer(tx, id)
			if l == nil {
				return fmt.Errorf("app %s: %w", a, ErrNotFound)
			}
			if top != nil && l.Parent != top.ID {
				return fmt.Errorf("%w: app %s was captured on layer %s, not on %s (recompose it first)",
					ErrNoParent, a, shortID(l.Parent), shortID(top.ID))
			}
			top = l
		}
		if top != nil {
			chain, err := chainTx(tx, top.ID)
			if err != nil {
				return err
			}
			if chain[len(chain)-1].Kind != KindBase {
				return fmt.Errorf("%w: the chain of %s does not end in a base layer", ErrInvalid, shortID(top.ID))
			}
			v.System = top.ID
		}
		if spec.User != "" {
			id, err := resolveTx(tx, spec.User)
			if err != nil {
				return fmt.Errorf("user layer: %w", err)
			}
			v.User = id
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("create desktop %s: %w", name, err)
	}
	sysRel, userRel := desktopFiles(name)
	files := []string{sysRel}
	d := &Desktop{Name: name, Created: v.Created, Head: 1, Versions: []Version{v}, SystemDisk: sysRel}
	if spec.UserOnly {
		files, d.SystemDisk = nil, ""
	}
	if v.User != "" || spec.UserSize > 0 {
		files = append(files, userRel)
		d.UserDisk = userRel
		d.UserSize = spec.UserSize
	}
	for _, f := range files {
		if _, err := os.Lstat(s.Path(f)); err == nil {
			return nil, fmt.Errorf("create desktop %s: %s exists without a record (see `cvd store check`)", name, f)
		}
	}
	p, err := s.Begin("desktop create", files)
	if err != nil {
		return nil, err
	}
	fail := func(err error) (*Desktop, error) {
		p.Abort()
		return nil, fmt.Errorf("create desktop %s: %w", name, err)
	}
	if d.SystemDisk != "" {
		if err := s.createTop(sysRel, v.System, 0); err != nil {
			return fail(err)
		}
	}
	if d.UserDisk != "" {
		if err := s.createTop(userRel, v.User, spec.UserSize); err != nil {
			return fail(err)
		}
	}
	if err := fsutil.Sync(s.Path(DesktopsDir)); err != nil {
		return fail(err)
	}
	err = p.commit(func(tx *catalog.Tx) error {
		if tx.Bucket(bucketDesktops).Get([]byte(name)) != nil {
			return fmt.Errorf("desktop %s: %w", name, ErrExists)
		}
		for _, id := range []string{v.System, v.User} {
			if id == "" {
				continue
			}
			if getLayer(tx, id) == nil {
				return fmt.Errorf("layer %s: %w", shortID(id), ErrNotFound)
			}
			if err := tx.Bucket(bucketRefs).Put(refKey(id, "desktop", name), nil); err != nil {
				return err
			}
		}
		if v.User == "" && d.UserDisk != "" && d.UserSize == 0 {
			return fmt.Errorf("%w: user disk without size", ErrInvalid)
		}
		return putDesktop(tx, d, nil)
	})
	if err != nil {
		return fail(err)
	}
	return d, nil
}

// createTop writes a writable top at the store-relative path rel: on layer id, or,
// when id is "", a blank disk of size bytes.
func (s *Store) createTop(rel, id string, size int64) error {
	enc, err := s.TopEncryption(rel)
	if err != nil {
		return err
	}
	co := disk.CreateOptions{Size: size, AllowedRoots: []string{s.dir}, Encrypt: enc}
	if id != "" {
		co.BackingFile = s.LayerPath(id)
		co.BackingFormat = disk.FormatQcow2
	}
	img, err := disk.Create(s.Path(rel), co)
	if err != nil {
		return err
	}
	err = img.Flush()
	if err2 := img.Close(); err == nil {
		err = err2
	}
	return err
}

// UpdateDesktop changes the desktop called name in one transaction: fn gets the
// record as it stands in that transaction and edits it (Versions, Head,
// SystemDisk, UserDisk, Switch); an error from fn aborts and changes nothing.
// When p is not nil the same transaction ends p, so the files it journaled (new
// tops the caller wrote) become the desktop's. In that transaction the desktop's
// layer refs are recomputed from its versions and pending switch (each layer must
// exist), and a top file the record named before and no longer names is
// journaled for removal and unlinked after the commit: a crash leaves either the
// old record with its files or the new record with its files.
func (s *Store) UpdateDesktop(p *Pending, name string, fn func(d *Desktop) error) (*Desktop, error) {
	if err := s.writable(); err != nil {
		return nil, err
	}
	if p != nil && (p.done || p.s != s) {
		return nil, fmt.Errorf("update desktop %s: %w: the pending operation is finished or of another store", name, ErrInvalid)
	}
	var (
		d       *Desktop
		dropKey []byte
		drop    []string
	)
	err := s.db.Update(func(tx *catalog.Tx) error {
		if err := s.dropDone(tx); err != nil {
			return err
		}
		old, legacy, err := readDesktop(tx, name)
		if err != nil {
			return err
		}
		stored := old.Versions
		if legacy {
			stored = nil
		}
		// The active lease's epoch, read in this transaction: the fence of a
		// check-in's commit (see Desktop.LeaseEpoch).
		err = tx.Query("SELECT epoch FROM leases WHERE desktop = ? AND state = 'active'", []any{name},
			func(scan func(dest ...any) error) error { return scan(&old.LeaseEpoch) })
		if err != nil {
			return err
		}
		cp, err := copyDesktop(old)
		if err != nil {
			return err
		}
		if err := fn(cp); err != nil {
			return err
		}
		if cp.Name != name {
			return fmt.Errorf("%w: a desktop cannot be renamed", ErrInvalid)
		}
		if cp.HeadVersion() == nil {
			return fmt.Errorf("%w: head version %d is not in the history", ErrInvalid, cp.Head)
		}
		if cp.SystemDisk == "" && (cp.HeadVersion().System != "" || cp.UserDisk == "") {
			return fmt.Errorf("%w: a desktop needs a system disk (or a user disk alone)", ErrInvalid)
		}
		seenN := map[int]bool{}
		for _, v := range cp.Versions {
			if seenN[v.N] {
				return fmt.Errorf("%w: version %d listed twice", ErrInvalid, v.N)
			}
			seenN[v.N] = true
		}
		// The refs change only where the layers kept change: a layer newly kept
		// must exist and gets its ref, one no longer kept loses it.
		had := map[string]bool{}
		for _, id := range old.layerRefs() {
			had[id] = true
		}
		rb := tx.Bucket(bucketRefs)
		for _, id := range cp.layerRefs() {
			if had[id] {
				delete(had, id)
				continue
			}
			if getLayer(tx, id) == nil {
				return fmt.Errorf("layer %s: %w", shortID(id), ErrNotFound)
			}
			if err := rb.Put(refKey(id, "desktop", name), nil); err != nil {
				return err
			}
		}
		for id := range had {
			if err := rb.Delete(refKey(id, "desktop", name)); err != nil {
				return err
			}
		}
		keep := map[string]bool{cp.SystemDisk: true, cp.UserDisk: true}
		for _, f := range []string{old.SystemDisk, old.UserDisk} {
			if f != "" && !keep[f] {
				drop = append(drop, f)
			}
		}
		if len(drop) > 0 {
			if dropKey, err = putPending(tx, s.dir, "desktop update", drop, false, s.now()); err != nil {
				return err
			}
		}
		if p != nil {
			if err := tx.Bucket(bucketPending).Delete(p.key); err != nil {
				return err
			}
		}
		d = cp
		return putDesktop(tx, cp, stored)
	})
	if err != nil {
		return nil, fmt.Errorf("update desktop %s: %w", name, err)
	}
	if p != nil {
		p.done = true
	}
	if dropKey != nil {
		if err := s.removeFiles(drop); err != nil {
			return d, fmt.Errorf("update desktop %s: remove old tops: %w (the store's next open retries)", name, err)
		}
		s.finished(dropKey)
	}
	return d, nil
}

// copyDesktop is a deep copy through JSON, so fn cannot alter the stored record.
func copyDesktop(d *Desktop) (*Desktop, error) {
	b, err := json.Marshal(d)
	if err != nil {
		return nil, err
	}
	var cp Desktop
	return &cp, json.Unmarshal(b, &cp)
}

// Desktops lists the desktops by name.
func (s *Store) Desktops() ([]Desktop, error) {
	var out []Desktop
	err := s.db.View(func(tx *catalog.Tx) error {
		versions, err := loadAllVersions(tx)
		if err != nil {
			return err
		}
		err = tx.Bucket(bucketDesktops).ForEach(func(k, v []byte) error {
			var d Desktop
			if err := json.Unmarshal(v, &d); err != nil {
				return fmt.Errorf("desktop %s: %w", k, err)
			}
			if len(d.Versions) == 0 {
				d.Versions = versions[d.Name]
			}
			for i := range d.Versions {
				d.Versions[i] = normalVersion(d.Versions[i])
			}
			out = append(out, d)
			return nil
		})
		if err != nil {
			return err
		}
		ps := make([]*Desktop, len(out))
		for i := range out {
			ps[i] = &out[i]
		}
		return fillHolders(tx, ps, "", s.now())
	})
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out, err
}

// Desktop returns the desktop called name.
func (s *Store) Desktop(name string) (*Desktop, error) {
	var d *Desktop
	err := s.db.View(func(tx *catalog.Tx) error {
		var err error
		if d, err = getDesktop(tx, name); err != nil {
			return err
		}
		return fillHolders(tx, []*Desktop{d}, name, s.now())
	})
	return d, err
}

func getDesktop(tx *catalog.Tx, name string) (*Desktop, error) {
	d, _, err := readDesktop(tx, name)
	return d, err
}

// RemoveDesktop removes a desktop, its tops and its version records (the layers
// stay; gc removes those nothing else keeps). Clones made from it keep working
// (they stand on layers, not on the desktop), but removing the desktop under them
// is refused with a *DependentsError unless withClones, which removes them too.
func (s *Store) RemoveDesktop(name string, withClones bool) (*Desktop, []Clone, error) {
	var d *Desktop
	var gone []Clone
	err := s.removeJournaled("desktop rm", func(tx *catalog.Tx) ([]string, error) {
		var err error
		d, err = getDesktop(tx, name)
		if err != nil {
			return nil, err
		}
		var clones []Clone
		err = tx.Bucket(bucketClones).ForEach(func(k, v []byte) error {
			var c Clone
			if _, err := getJSON(tx.Bucket(bucketClones), string(k), &c); err != nil {
				return err
			}
			if c.Desktop == name {
				clones = append(clones, c)
			}
			return nil
		})
		if err != nil {
			return nil, err
		}
		if len(clones) > 0 && !withClones {
			e := &DependentsError{What: "desktop " + name}
			for _, c := range clones {
				e.Dependents = append(e.Dependents, Dependent{Kind: "clone", Name: c.Name})
			}
			return nil, e
		}
		var files []string
		for _, c := range clones {
			f, err := deleteCloneTx(tx, c.Name)
			if err != nil {
				return nil, err
			}
			files = append(files, f...)
		}
		gone = clones
		for _, id := range d.layerRefs() {
			if err := tx.Bucket(bucketRefs).Delete(refKey(id, "desktop", name)); err != nil {
				return nil, err
			}
		}
		files = append(files, d.SystemDisk)
		if d.UserDisk != "" {
			files = append(files, d.UserDisk)
		}
		return files, deleteDesktop(tx, name)
	})
	if err != nil {
		return nil, nil, err
	}
	return d, gone, nil
}
