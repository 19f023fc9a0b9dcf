package syncd

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/cvd-project/cvd/syncd/state"

	"github.com/cvd-project/cvd/catalog"
	"github.com/cvd-project/cvd/desktop"
	"github.com/cvd-project/cvd/disk"
	"github.com/cvd-project/cvd/images"
	"github.com/cvd-project/cvd/syncd/proto"
)

func (s *Server) handleCommit(w http.ResponseWriter, r *http.Request, dev *Device) error {
	se, err := s.sessionFor(r, dev)
	if err != nil {
		return err
	}
	res, err := s.commit(r.Context(), se, dev)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, res)
	return nil
}

// commit builds the check-in's layers from the staged clusters and those the
// store already holds, seals them and checks their IDs against the laptop's. Then
// one transaction of the catalog adds the version and moves the head (unless it is
// a conflict); until it, the desktop's head and versions are as they were. The
// version's note names the check-in, so that a commit cut after that transaction
// completes (indexes the new clusters, marks the check-in committed) when asked
// again, without a second version.
func (s *Server) commit(ctx context.Context, se *Session, dev *Device) (*proto.CheckinResult, error) {
	unlock, err := s.lockDesktop(ctx, se.Desktop)
	if err != nil {
		return nil, err
	}
	defer unlock()
	release, err := s.claimSession(se) // re-reads it under the lock
	if err != nil {
		return nil, err
	}
	defer release()
	if se.State == proto.SessionCommitted {
		return se.Result, nil
	}
	dv, err := desktopVersions(s.store, se.Desktop)
	if err != nil {
		return nil, err
	}
	if v := dv.checkinVersion(se.ID); v != nil {
		res := &proto.CheckinResult{Desktop: se.Desktop, Version: v.N, Head: dv.Head, Conflict: v.Conflict,
			Layers: resultLayers(se, v), Bytes: se.Received, Committed: s.now().UTC()}
		return res, s.finishCommit(se, res, nil)
	}
	if len(se.Lists) != len(se.Disks) {
		return nil, fmt.Errorf("%w: entry lists missing (have %v)", proto.ErrIncomplete, se.Lists)
	}
	conflict, epoch, err := s.leaseForCheckin(&se.CheckinRequest, dev)
	if err != nil {
		return nil, err
	}
	m, err := s.openSession(se)
	if err != nil {
		return nil, err
	}
	miss, srcs, err := s.missing(ctx, se, m)
	if err != nil {
		return nil, err
	}
	if len(miss) > 0 {
		return nil, fmt.Errorf("%w: %d clusters still missing", proto.ErrIncomplete, len(miss))
	}
	res := &proto.CheckinResult{Desktop: se.Desktop, Layers: map[string]string{}, Bytes: se.Received}

	// Server-side changes made while the desktop was out are kept as their own
	// version first; the check-in then no longer starts from the head.
	res.ServerSealed, err = s.sealServerTops(ctx, se.Desktop, "server changes during check-out")
	if err != nil {
		return nil, err
	}
	if dv, err = desktopVersions(s.store, se.Desktop); err != nil {
		return nil, err
	}
	push := pushOf(se)
	if !push.FastForward(dv.HeadVersion()) {
		conflict = true
	}
	nv := proto.Version{Created: s.now().UTC().Truncate(time.Second), From: se.Base,
		Conflict: conflict, Device: dev.Name, Bytes: se.Received,
		Kind: images.VersionCheckin, Checkin: se.ID, Note: desktop.CheckinNote(images.VersionCheckin, se.ID)}
	switch {
	case se.Snapshot:
		nv.Conflict, nv.Kind, nv.Note = false, images.VersionSnapshot, desktop.CheckinNote(images.VersionSnapshot, se.ID)
	case conflict:
		nv.Kind, nv.Note = images.VersionConflict, desktop.CheckinNote(images.VersionConflict, se.ID)
	}
	if base := dv.Version(se.Base); base != nil {
		nv.System, nv.User = base.System, base.User
	}
	newEntries := map[string][]proto.Entry{}
	for _, d := range se.Disks {
		if d.Entries == 0 {
			continue // the base version's layer (the device's may be recomposed onto its base variant)
		}
		state.SetLayer(&nv, d.Name, d.Parent)
		dl := m.lists[d.Name]
		if l, err := s.store.Layer(d.ExpectID); err == nil && l.Parent == d.Parent {
			// The store holds this content already (a commit retried after its
			// layer was made, or the same changes from elsewhere).
			res.Clusters += d.DataEntries
			state.SetLayer(&nv, d.Name, l.ID)
			newEntries[l.ID] = dl.entries
			continue
		}
		t0 := time.Now()
		n, err := s.fillStage(ctx, m, dl, srcs[d.Name])
		if err != nil {
			return nil, err
		}
		t1 := time.Now()
		res.Deduplicated += n
		res.Clusters += d.DataEntries
		l, err := s.sealStage(ctx, m, dl)
		if err != nil {
			return nil, err
		}
		s.log.Debug("commit: disk sealed", "disk", d.Name, "fill", t1.Sub(t0), "seal", time.Since(t1))
		state.SetLayer(&nv, d.Name, l.ID)
		newEntries[l.ID] = dl.entries
	}
	dv, v, err := addVersion(s.store, se.Desktop, nv, !conflict && !se.Snapshot, epoch, push)
	if err != nil {
		return nil, err
	}
	conflict = v.Conflict
	res.Layers = resultLayers(se, v)
	res.Version, res.Head, res.Conflict, res.Committed = v.N, dv.Head, conflict, s.now().UTC()
	if conflict && !se.Snapshot {
		mr, err := s.mergeUserFiles(ctx, se.Desktop, dev, v, push)
		switch {
		case err != nil:
			s.log.Warn("check-in: the user files were not merged; the check-in stays a conflict version",
				"desktop", se.Desktop, "device", dev.Name, "version", v.N, "err", err)
		case mr != nil:
			res.Merge, res.Head = mr, mr.Version
		}
	}
	if s.failpoint != nil {
		if err := s.failpoint("commit:catalog"); err != nil {
			return nil, err
		}
	}
	if err := s.finishCommit(se, res, newEntries); err != nil {
		return nil, err
	}
	s.m.checkins(strings.Fields(nv.Note)[0])
	s.m.committedCheckin(res.Clusters, res.Deduplicated)
	s.log.Info("check-in committed", "desktop", se.Desktop, "device", dev.Name, "version", v.N,
		"conflict", conflict, "head", res.Head, "bytes", res.Bytes, "deduplicated", res.Deduplicated)
	if !conflict && !se.Snapshot {
		if err := s.resetTops(dv, v); err != nil {
			s.log.Error("reset tops after check-in (the next start of the server retries)", "err", err)
		}
	}
	s.dropSession(se.ID)
	removeAllQuiet(m.dir)
	return res, nil
}

// resultLayers is the layer each disk of a check-in stands on after it: the
// version's for a disk it changed, the device's own for one it left alone.
func resultLayers(se *Session, v *proto.Version) map[string]string {
	out := map[string]string{}
	for _, d := range se.Disks {
		out[d.Name] = d.Parent
		if d.Entries > 0 {
			out[d.Name] = state.LayerOf(v, d.Name)
		}
	}
	return out
}

// pushOf says which disks a check-in changes, and on which layers.
func pushOf(se *Session) *desktop.Push {
	p := &desktop.Push{}
	for _, d := range se.Disks {
		if d.Entries == 0 {
			continue
		}
		parent := d.Parent
		if d.Name == proto.DiskSystem {
			p.System = &parent
		} else {
			p.User = &parent
		}
	}
	return p
}

// sealStage makes a disk's completed staging layer the layer the laptop expects.
// The staging file itself becomes the layer (images.Store.Adopt): nothing is
// copied. A staging file the store cannot adopt as it is (it does not check
// clean) is sealed as a copy. A staging layer that does not hold what its list
// says is removed: its clusters are asked for again.
func (s *Server) sealStage(ctx context.Context, m *session, dl *diskList) (*images.Layer, error) {
	d := dl.d
	stage := filepath.Join(m.dir, d.Name+".qcow2")
	opts := images.AdoptOptions{WantID: d.ExpectID, RewriteBacking: true}
	if s.freshStage(stage, false) {
		opts.Sums = proto.EntrySums(slices.Values(dl.entries), d.Size, d.ClusterSize)
	}
	l, _, err := state.AdoptTop(ctx, s.store, s.log, stage, opts)
	if errors.Is(err, images.ErrIDMismatch) {
		// A staged cluster does not hold what its list says: start the disk over.
		os.Remove(stage)
		s.freshStage(stage, true)
		s.dropSession(m.id)
		return nil, fmt.Errorf("%w: the %s disk: %v: its clusters will be asked for again", proto.ErrIncomplete, d.Name, err)
	}
	if err != nil {
		return nil, proto.NoSpace(fmt.Errorf("seal the %s disk of check-in %s: %w", d.Name, m.id, err))
	}
	// The layer holds the data now; the staging name (whose backing name Adopt
	// rewrote for the layers directory) goes.
	os.Remove(stage)
	s.freshStage(stage, true)
	return l, nil
}

// finishCommit releases the lease when asked and marks the check-in committed
// with its result, in one transaction of syncd's state; then the new layers'
// clusters are indexed from their lists, in the background (a server stopped
// before that indexes them from the files at its next check-in).
func (s *Server) finishCommit(se *Session, res *proto.CheckinResult, newEntries map[string][]proto.Entry) error {
	defer s.indexEntriesLater(newEntries)
	return s.st.Update(func(tx *catalog.Tx) error {
		if se.Release {
			if l, err := activeLease(tx, se.Desktop); err != nil {
				return err
			} else if l != nil && l.ID == se.Lease {
				if err := endLease(tx, l, "released", s.now()); err != nil {
					return err
				}
				res.Released = true
			}
		}
		se.State, se.Result = proto.SessionCommitted, res
		return state.PutJSON(tx, state.BucketSessions, se.ID, se)
	})
}

// indexEntriesLater records the clusters of new layers in the index, from the
// lists they were committed with, on a goroutine: the commit's answer does not
// wait for it, and the next check-in's search for missing clusters does
// (ensureIndexed takes the same lock).
func (s *Server) indexEntriesLater(newEntries map[string][]proto.Entry) {
	if len(newEntries) == 0 {
		return
	}
	s.bgIndex.Add(1)
	go func() {
		defer s.bgIndex.Done()
		release, err := s.st.DB.Lock(s.bgCtx, "index", false)
		if err != nil {
			return
		}
		defer release()
		err = s.st.Update(func(tx *catalog.Tx) error {
			for id, ents := range newEntries {
				if state.IsIndexed(tx, id) {
					continue
				}
				if err := state.IndexEntries(tx, id, ents); err != nil {
					return err
				}
				if err := state.MarkIndexed(tx, id, int64(len(ents))); err != nil {
					return err
				}
			}
			return nil
		})
		if err != nil {
			s.log.Warn("index the clusters of new layers (the next check-in indexes them from the files)", "err", err)
			return
		}
		for id := range newEntries {
			s.knowIndexed(id)
		}
	}()
}

// fillStage completes a disk's staging layer: zero entries, clusters repeated
// within the check-in, and clusters copied from layers of the store (each read back
// and checked against its digest). It returns how many clusters came from the
// store or from repeats. A stale index entry is dropped and reported as
// ErrIncomplete: the laptop then sends that cluster.
func (s *Server) fillStage(ctx context.Context, m *session, dl *diskList, ss []source) (int64, error) {
	cs := dl.d.ClusterSize
	img, err := s.openStage(m.dir, dl.d)
	if err != nil {
		return 0, err
	}
	defer img.Close()
	w := state.NewStageWriter(img, int64(cs))
	buf := make([]byte, cs)
	var n int64
	zeros := proto.ZeroRun{Write: func(start, count int64) error {
		w.Sync()
		off := start * int64(cs)
		return proto.NoSpace(img.WriteZeroes(off, min(count*int64(cs), img.Size()-off)))
	}}
	open := map[string]disk.Image{}
	defer func() {
		for _, im := range open {
			im.Close()
		}
	}()
	var stale []proto.Digest
	for i, e := range dl.entries {
		if err := ctx.Err(); err != nil {
			return 0, err
		}
		if e.Zero {
			if err := zeros.Add(e.Index, 1); err != nil {
				return 0, err
			}
			continue
		}
		src := ss[i]
		if src.staged {
			continue
		}
		if err := zeros.Flush(); err != nil {
			return 0, err
		}
		var data []byte
		switch {
		case src.fromDisk != "":
			w.Sync()
			from := img
			if src.fromDisk != dl.d.Name {
				from = open["stage:"+src.fromDisk]
				if from == nil {
					from, err = disk.Open(filepath.Join(m.dir, src.fromDisk+".qcow2"), disk.OpenOptions{ReadOnly: true, NoBacking: true})
					if err != nil {
						return 0, err
					}
					open["stage:"+src.fromDisk] = from
				}
			}
			data, err = state.ReadClusterFrom(from, src.fromIdx, cs, e.Digest, buf)
		case src.ref.Layer != "":
			from := open[src.ref.Layer]
			if from == nil {
				from, err = s.store.OpenLayer(src.ref.Layer, true)
				if err == nil {
					open[src.ref.Layer] = from
				}
			}
			if err == nil {
				data, err = state.ReadClusterFrom(from, src.ref.Index, images.DigestClusterSize(from.Info()), e.Digest, buf)
			}
			if err != nil {
				stale = append(stale, e.Digest)
				err = nil
				continue
			}
		default:
			return 0, fmt.Errorf("%w: cluster %d of disk %s has no source", proto.ErrIncomplete, e.Index, dl.d.Name)
		}
		if err != nil {
			return 0, err
		}
		if len(data) != int(min(int64(cs), dl.d.Size-e.Index*int64(cs))) {
			return 0, fmt.Errorf("cluster %d of disk %s: source holds %d bytes", e.Index, dl.d.Name, len(data))
		}
		if err := w.Write(e.Index, data); err != nil {
			return 0, err
		}
		n++
	}
	if err := zeros.Flush(); err != nil {
		return 0, err
	}
	if err := w.Flush(); err != nil {
		return 0, err
	}
	if len(stale) > 0 {
		s.st.Update(func(tx *catalog.Tx) error {
			for _, d := range stale {
				tx.Bucket(state.BucketClusters).Delete(d[:])
			}
			return nil
		})
		return 0, fmt.Errorf("%w: %d clusters the index named are gone from the store; they will be asked for", proto.ErrIncomplete, len(stale))
	}
	return n, nil
}
