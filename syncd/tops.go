package syncd

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"github.com/cvd-project/cvd/desktop"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/cvd-project/cvd/catalog"
	"github.com/cvd-project/cvd/disk"
	"github.com/cvd-project/cvd/images"
)

// A desktop's writable tops (desktops/<name>.system.qcow2, .user.qcow2) always
// stand on the head version's layers: after sync moves the head it replaces them by
// fresh, empty tops (see .cache/requests-syncd.md, item 1). A top that holds data is
// never replaced: it is sealed as a version first.

// topRel returns the store-relative top of a disk ("" when the desktop has none).
func (dv *DesktopVersions) topRel(diskName string) string {
	if diskName == DiskSystem {
		return dv.SystemDisk
	}
	return dv.UserDisk
}

// layerOf is the layer a version's disk stands on.
func layerOf(v *Version, diskName string) string {
	if diskName == DiskSystem {
		return v.System
	}
	return v.User
}

func setLayer(v *Version, diskName, id string) {
	if diskName == DiskSystem {
		v.System = id
	} else {
		v.User = id
	}
}

// topState opens a top alone and reports whether it allocates anything and the
// layer ID its backing file names ("" for none).
func topState(path string) (hasData bool, backing string, err error) {
	img, err := disk.Open(path, disk.OpenOptions{ReadOnly: true, NoBacking: true})
	if err != nil {
		return false, "", err
	}
	defer img.Close()
	if bn := img.Info().BackingName; bn != "" {
		backing = strings.TrimSuffix(filepath.Base(bn), ".qcow2")
	}
	hasData, err = layerHasData(img)
	return hasData, backing, err
}

func randHex(n int) string {
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		panic(err)
	}
	return hex.EncodeToString(b)
}

// adoptTop makes the top at path the layer opts.WantID without copying it
// (images.Store.Adopt). A top the store cannot take as it is (it does not check
// clean: a VM killed while it wrote leaves leaked clusters) is sealed as a copy
// instead, with the same check of its ID (images.ErrIDMismatch).
func adoptTop(ctx context.Context, store *images.Store, log *slog.Logger, path string, opts images.AdoptOptions) (*images.Layer, bool, error) {
	l, existed, err := store.Adopt(ctx, path, opts)
	if !errors.Is(err, images.ErrNotAdoptable) {
		return l, existed, err
	}
	log.Warn("not adoptable in place; copying it", "file", path, "err", err)
	l, existed, err = sealTop(ctx, store, path, nil, false)
	if err == nil && l.ID != opts.WantID {
		if !existed {
			store.RemoveLayer(l.ID)
		}
		return nil, false, fmt.Errorf("%w: it has ID %s, expected %s", images.ErrIDMismatch, short(l.ID), short(opts.WantID))
	}
	return l, existed, err
}

// sealTop seals the top at path into the store as a layer on the one it stands on
// (a top without a backing file becomes a layer without a parent).
func sealTop(ctx context.Context, store *images.Store, path string, names []string, force bool) (*images.Layer, bool, error) {
	img, err := disk.Open(path, disk.OpenOptions{ReadOnly: true, NoBacking: true})
	if err != nil {
		return nil, false, err
	}
	backing := img.Info().BackingName
	img.Close()
	opts := images.ImportOptions{Names: names, Force: force}
	if backing == "" {
		opts.Kind = images.KindBase
		return store.Import(ctx, path, opts)
	}
	return store.Seal(ctx, path, opts)
}

// sealServerTops seals the desktop's tops that hold data as a new head version
// (note says why) and resets them. It returns the version, or 0 when the tops were
// empty. The caller holds the desktop's lock.
func (s *Server) sealServerTops(ctx context.Context, name, note string) (int, error) {
	dv, err := desktopVersions(s.store, name)
	if err != nil {
		return 0, err
	}
	head := *dv.HeadVersion()
	nv := Version{Created: s.now().UTC().Truncate(time.Second), System: head.System, User: head.User,
		Kind: images.VersionSeal, Note: note, From: head.N}
	if d, err := s.store.Desktop(name); err != nil {
		return 0, err
	} else if err := topsNotInUse(s.store, d); err != nil {
		return 0, err
	}
	changed := false
	for _, dn := range diskNames {
		rel := dv.topRel(dn)
		if rel == "" {
			continue
		}
		has, _, err := topState(s.store.Path(rel))
		if err != nil {
			return 0, fmt.Errorf("desktop %s: %s top: %w", name, dn, err)
		}
		if !has {
			continue
		}
		l, _, err := sealTop(ctx, s.store, s.store.Path(rel), nil, false)
		if err != nil {
			return 0, noSpace(fmt.Errorf("desktop %s: seal %s top: %w", name, dn, err))
		}
		setLayer(&nv, dn, l.ID)
		changed = true
	}
	if !changed {
		return 0, nil
	}
	dv, v, err := addVersion(s.store, name, nv, true, 0)
	if err != nil {
		return 0, err
	}
	s.log.Info("sealed server tops", "desktop", name, "version", v.N, "note", note)
	if err := s.resetTops(dv, v); err != nil {
		return 0, err
	}
	s.indexLater(v.System, v.User)
	return v.N, nil
}

// topsNotInUse refuses (ErrInUse) when a QEMU process holds one of the desktop's
// tops open: whatever libvirt says, a top a VM still writes is never sealed.
func topsNotInUse(store *images.Store, d *images.Desktop) error {
	for _, rel := range []string{d.SystemDisk, d.UserDisk} {
		if rel == "" {
			continue
		}
		if err := disk.CheckNotInUse(store.Path(rel)); err != nil {
			if errors.Is(err, disk.ErrInUse) {
				return fmt.Errorf("desktop %s: %w: %v; shut the VM down first (nothing was changed)", d.Name, ErrInUse, err)
			}
			return err
		}
	}
	return nil
}

// resetTops points the desktop's tops at version v's layers.
func (s *Server) resetTops(dv *DesktopVersions, v *Version) error {
	d := &images.Desktop{Name: dv.Name, SystemDisk: dv.SystemDisk, UserDisk: dv.UserDisk, UserSize: dv.UserSize}
	return noSpace(desktop.ResetTops(s.store, d, *v))
}

// indexLater indexes new layers in the background.
func (s *Server) indexLater(ids ...string) {
	s.bgIndex.Add(1)
	go func() {
		defer s.bgIndex.Done()
		if err := s.ensureIndexed(s.bgCtx); err != nil && s.bgCtx.Err() == nil {
			s.log.Warn("index layers", "layers", ids, "err", err)
		}
	}()
}

// reconcile finishes what a crash interrupted: tops that do not stand on their
// desktop's head (a commit that did not reset them) are reset when empty; staging
// layers of open check-ins that do not check clean are dropped (their clusters are
// asked for again); old check-ins are forgotten.
func (s *Server) reconcile(ctx context.Context) error {
	if err := s.reconcileSessions(); err != nil {
		return err
	}
	if err := s.migrateVersions(); err != nil {
		return err
	}
	ds, err := s.store.Desktops()
	if err != nil {
		return err
	}
	for _, d := range ds {
		dv := versionsOf(&d)
		head := dv.HeadVersion()
		if head == nil {
			continue
		}
		for _, dn := range diskNames {
			rel := dv.topRel(dn)
			if rel == "" {
				continue
			}
			has, backing, err := topState(s.store.Path(rel))
			if err != nil {
				s.log.Warn("reconcile: open top", "desktop", dv.Name, "disk", dn, "err", err)
				continue
			}
			if backing == layerOf(head, dn) {
				continue
			}
			if has {
				s.log.Warn("reconcile: top holds data and does not stand on the head; it will be sealed at the next check-out",
					"desktop", dv.Name, "disk", dn)
				continue
			}
			size := int64(0)
			if layerOf(head, dn) == "" {
				size = dv.UserSize
			}
			if err := desktop.ResetTop(s.store, rel, layerOf(head, dn), size); err != nil {
				return err
			}
			s.log.Info("reconcile: reset top onto head", "desktop", dv.Name, "disk", dn, "version", head.N)
		}
	}
	return nil
}

// Check-ins left open longer than sessionMaxAge are removed; committed ones are
// remembered that long (a rerun of a committed check-in finds its result).
const sessionMaxAge = 14 * 24 * time.Hour

func (s *Server) reconcileSessions() error {
	var sessions []Session
	err := s.st.view(func(tx *catalog.Tx) error {
		return tx.Bucket(bucketSessions).ForEach(func(k, v []byte) error {
			var se Session
			if _, err := getJSON(tx, bucketSessions, string(k), &se); err != nil {
				return err
			}
			sessions = append(sessions, se)
			return nil
		})
	})
	if err != nil {
		return err
	}
	var drop []string
	for _, se := range sessions {
		if s.now().Sub(se.Created) > sessionMaxAge {
			drop = append(drop, se.ID)
			removeAllQuiet(s.sessionDir(se.ID))
			continue
		}
		if se.State != stateReceiving {
			continue
		}
		for _, d := range se.Disks {
			p := filepath.Join(s.sessionDir(se.ID), d.Name+".qcow2")
			if _, err := os.Stat(p); err != nil {
				continue
			}
			if r, err := disk.Check(p, true); err != nil || r.Corruptions > r.CorruptionsFixed || r.CheckErrors > 0 {
				s.log.Warn("dropping a staging layer that does not check clean", "check-in", se.ID, "disk", d.Name)
				os.Remove(p)
			}
		}
	}
	if len(drop) == 0 {
		return nil
	}
	return s.st.update(func(tx *catalog.Tx) error {
		for _, id := range drop {
			if err := tx.Bucket(bucketSessions).Delete([]byte(id)); err != nil {
				return err
			}
		}
		return nil
	})
}
