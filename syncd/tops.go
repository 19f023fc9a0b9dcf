package syncd

import (
	"context"
	"time"

	"github.com/cvd-project/cvd/syncd/state"

	"github.com/cvd-project/cvd/catalog"
	"github.com/cvd-project/cvd/desktop"
	"github.com/cvd-project/cvd/images"
	"github.com/cvd-project/cvd/syncd/proto"
)

// A desktop's writable tops always stand on the head version's layers (see
// package desktop: SealTops, ResetTops, RepairTops).

// topRel returns the store-relative top of a disk ("" when the desktop has none).
func (dv *DesktopVersions) topRel(diskName string) string {
	if diskName == proto.DiskSystem {
		return dv.SystemDisk
	}
	return dv.UserDisk
}

// sealServerTops seals the desktop's tops that hold data as a new head version
// (note says why) and resets them (desktop.SealTops). It returns the version, or
// 0 when the tops were empty. The caller holds the desktop's lock.
func (s *Server) sealServerTops(ctx context.Context, name, note string) (int, error) {
	_, v, err := desktop.SealTops(ctx, s.store, name, note, s.now())
	if err != nil || v == nil {
		return 0, proto.NoSpace(err)
	}
	s.log.Info("sealed server tops", "desktop", name, "version", v.N, "note", note)
	s.indexLater(v.System, v.User)
	return v.N, nil
}

// resetTops points the desktop's tops at version v's layers.
func (s *Server) resetTops(dv *DesktopVersions, v *proto.Version) error {
	d := &images.Desktop{Name: dv.Name, SystemDisk: dv.SystemDisk, UserDisk: dv.UserDisk, UserSize: dv.UserSize}
	return proto.NoSpace(desktop.ResetTops(s.store, d, *v))
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
	for i := range ds {
		reset, kept, err := desktop.RepairTops(s.store, &ds[i])
		if err != nil {
			s.log.Warn("reconcile: tops", "desktop", ds[i].Name, "err", err)
		}
		for _, dn := range reset {
			s.log.Info("reconcile: reset top onto head", "desktop", ds[i].Name, "disk", dn, "version", ds[i].Head)
		}
		for _, dn := range kept {
			s.log.Warn("reconcile: top holds data and does not stand on the head; it will be sealed at the next check-out",
				"desktop", ds[i].Name, "disk", dn)
		}
	}
	return nil
}

// Check-ins left open longer than sessionMaxAge are removed; committed ones are
// remembered that long (a rerun of a committed check-in finds its result).
const sessionMaxAge = 14 * 24 * time.Hour

func (s *Server) reconcileSessions() error {
	var sessions []Session
	err := s.st.View(func(tx *catalog.Tx) error {
		return tx.Bucket(state.BucketSessions).ForEach(func(k, v []byte) error {
			var se Session
			if _, err := state.GetJSON(tx, state.BucketSessions, string(k), &se); err != nil {
				return err
			}
			sessions = append(sessions, se)
			return nil
		})
	})
	if err != nil {
		return err
	}
	// The staging layers of the others are checked when a server next takes
	// them (claimSession): another server of the site may be writing them now.
	for _, se := range sessions {
		if s.now().Sub(se.Created) <= sessionMaxAge {
			continue
		}
		if _, err := s.removeSession(se.ID); err != nil {
			return err
		}
	}
	return nil
}
