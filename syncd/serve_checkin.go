package syncd

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"syscall"
	"time"

	"github.com/cvd-project/cvd/syncd/state"

	"github.com/cvd-project/cvd/catalog"
	"github.com/cvd-project/cvd/disk"
	"github.com/cvd-project/cvd/images"
	"github.com/cvd-project/cvd/syncd/proto"
)

// Session is a check-in on the server: its request, which entry lists arrived,
// and once committed, its result. Its files live in <store>/sync/sessions/<id>/:
// <disk>.entries (the list) and <disk>.qcow2, the staging layer on the disk's
// parent that receives the clusters. The staging layer's own allocation is the
// record of what arrived: a resumed check-in asks only for the rest.
type Session struct {
	proto.CheckinRequest
	Device     string               `json:"device"`
	DeviceName string               `json:"device_name"`
	State      string               `json:"state"` // receiving, committed
	Created    time.Time            `json:"created"`
	Lists      []string             `json:"lists"`
	Received   int64                `json:"received_bytes"`
	Clusters   int64                `json:"received_clusters"`
	Result     *proto.CheckinResult `json:"result,omitempty"`
	// Holder is the server process that last took the check-in's lock (see
	// claimSession).
	Holder string `json:"holder,omitempty"`
}

// session is an open check-in in memory: its entry lists, loaded once (again
// when another server added one).
type session struct {
	id    string
	dir   string
	lists map[string]*diskList
}

type diskList struct {
	d       proto.CheckinDisk
	no      byte
	entries []proto.Entry // in index order (the list's order)
}

// digestAt is the digest of the data entry at cluster idx (false: none). The
// entries are searched, not mapped: a list's memory is its entries alone.
func (dl *diskList) digestAt(idx int64) (proto.Digest, bool) {
	i, ok := slices.BinarySearchFunc(dl.entries, idx, func(e proto.Entry, t int64) int { return cmp.Compare(e.Index, t) })
	if !ok || dl.entries[i].Zero {
		return proto.Digest{}, false
	}
	return dl.entries[i].Digest, true
}

var sessionIDRE = regexp.MustCompile(`^[0-9a-f]{32,64}$`)

func (s *Server) sessionDir(id string) string { return s.syncPath(state.SessionsDir, id) }

// getSession loads the session record.
func (s *Server) getSession(id string) (*Session, error) {
	if !sessionIDRE.MatchString(id) {
		return nil, proto.BadRequest("check-in id %q", id)
	}
	var se Session
	var ok bool
	err := s.st.View(func(tx *catalog.Tx) error {
		var err error
		ok, err = state.GetJSON(tx, state.BucketSessions, id, &se)
		return err
	})
	if err != nil {
		return nil, err
	}
	if !ok {
		return nil, fmt.Errorf("check-in %s: %w", id, proto.ErrNotFound)
	}
	return &se, nil
}

func (s *Server) putSession(se *Session) error {
	return s.st.Update(func(tx *catalog.Tx) error { return state.PutJSON(tx, state.BucketSessions, se.ID, se) })
}

// openSession returns the in-memory session, loading its entry lists.
func (s *Server) openSession(se *Session) (*session, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if m := s.sessions[se.ID]; m != nil && len(m.lists) == len(se.Lists) {
		return m, nil
	}
	m := &session{id: se.ID, dir: s.sessionDir(se.ID), lists: map[string]*diskList{}}
	for _, d := range se.Disks {
		if !slices.Contains(se.Lists, d.Name) {
			continue
		}
		dl, err := loadList(filepath.Join(m.dir, d.Name+".entries"), d)
		if err != nil {
			return nil, err
		}
		m.lists[d.Name] = dl
	}
	s.sessions[se.ID] = m
	return m, nil
}

// claimSession takes the check-in's lock of the site for an upload or a commit
// (ErrIncomplete when a request here or on another server holds it) and re-reads
// its record into se. When another process was the last to work on it, its
// staging layers are checked first (a server killed in mid-write may have left
// them torn: one that does not check clean is dropped, its clusters asked for
// again) and no longer taken as fresh here; the record then names this process.
func (s *Server) claimSession(se *Session) (release func(), err error) {
	release, err = s.st.DB.TryLock("checkin/"+se.ID, false)
	if errors.Is(err, catalog.ErrLocked) {
		return nil, fmt.Errorf("%w: check-in %s is receiving an upload or committing (here or on another server)", proto.ErrIncomplete, se.ID)
	}
	if err != nil {
		return nil, err
	}
	cur, err := s.getSession(se.ID)
	if err == nil && cur.Holder != s.instance && cur.State == proto.SessionReceiving {
		s.checkStages(cur)
		s.dropSession(se.ID)
		err = s.st.Update(func(tx *catalog.Tx) error {
			var c Session
			if _, err := state.GetJSON(tx, state.BucketSessions, se.ID, &c); err != nil {
				return err
			}
			c.Holder = s.instance
			*cur = c
			return state.PutJSON(tx, state.BucketSessions, se.ID, &c)
		})
	}
	if err != nil {
		release()
		return nil, err
	}
	*se = *cur
	return release, nil
}

// checkStages drops the staging layers of a check-in that do not check clean,
// and forgets that this process made any of them.
func (s *Server) checkStages(se *Session) {
	for _, d := range se.Disks {
		p := filepath.Join(s.sessionDir(se.ID), d.Name+".qcow2")
		s.freshStage(p, true)
		if _, err := os.Stat(p); err != nil {
			continue
		}
		if r, err := disk.Check(p, true); err != nil || r.Corruptions > r.CorruptionsFixed || r.CheckErrors > 0 {
			s.log.Warn("dropping a staging layer that does not check clean", "check-in", se.ID, "disk", d.Name)
			os.Remove(p)
		}
	}
}

// removeSession forgets a check-in (its record, files and lists in memory)
// unless a request here or on another server holds it (removed false).
func (s *Server) removeSession(id string) (removed bool, err error) {
	release, err := s.st.DB.TryLock("checkin/"+id, false)
	if errors.Is(err, catalog.ErrLocked) {
		return false, nil
	} else if err != nil {
		return false, err
	}
	defer release()
	s.dropSession(id)
	if err := s.st.Update(func(tx *catalog.Tx) error { return tx.Bucket(state.BucketSessions).Delete([]byte(id)) }); err != nil {
		return false, err
	}
	removeAllQuiet(s.sessionDir(id))
	return true, nil
}

func (s *Server) dropSession(id string) {
	s.mu.Lock()
	delete(s.sessions, id)
	s.mu.Unlock()
}

func loadList(path string, d proto.CheckinDisk) (*diskList, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	no, _ := proto.DiskNumber(d.Name)
	dl := &diskList{d: d, no: no, entries: make([]proto.Entry, 0, min(d.Entries, 1<<16))}
	err = proto.ReadEntries(f, d.Entries, state.ClustersOf(d.Size, d.ClusterSize), d.Parent != "", func(e proto.Entry) error {
		dl.entries = append(dl.entries, e)
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("entry list %s: %w", path, err)
	}
	return dl, nil
}

func (s *Server) checkinDesktop(dev *Device, name string) error {
	if err := images.CheckObjectName("desktop", name); err != nil {
		return proto.BadRequest("%v", err)
	}
	if !dev.Bound(name) || dev.Host() {
		return fmt.Errorf("%w: device %s, desktop %s", proto.ErrForbidden, dev.Name, name)
	}
	return nil
}

// leaseForCheckin checks dev's lease: conflict is true for a lease that an
// administrator broke (the check-in is kept as a conflict version); else epoch
// is the lease's, the fence of the commit's transaction (desktop.AddVersion).
// A check-in without a lease (an inactive device of the desktop's group) may
// change the user disk alone, or be a snapshot; a change of its system disk is
// refused, naming the active device.
func (s *Server) leaseForCheckin(req *proto.CheckinRequest, dev *Device) (conflict bool, epoch int64, err error) {
	if req.Lease == "" {
		if req.Snapshot || !slices.ContainsFunc(req.Disks, func(d proto.CheckinDisk) bool { return d.Name == proto.DiskSystem && d.Entries > 0 }) {
			return false, 0, nil
		}
		return false, 0, s.notActive(req.Desktop, dev)
	}
	err = s.st.View(func(tx *catalog.Tx) error {
		l, err := ownLease(tx, req.Desktop, dev, req.Lease, s.now())
		if err != nil && l != nil && l.State == "broken" {
			conflict = true
			return nil
		}
		if l != nil {
			epoch = l.Epoch
		}
		return err
	})
	return conflict, epoch, err
}

// notActive is the refusal of a system-disk change from a device that is not
// the desktop's active one.
func (s *Server) notActive(desktop string, dev *Device) error {
	var l *proto.Lease
	if err := s.st.View(func(tx *catalog.Tx) (err error) { l, err = activeLease(tx, desktop); return err }); err != nil {
		return err
	}
	if l == nil || l.Expired(s.now()) {
		return fmt.Errorf("desktop %s: %w: device %s may push its user disk only; no device is active: open the desktop on %s first (cvd open)",
			desktop, proto.ErrNotActive, dev.Name, dev.Name)
	}
	return &proto.LeaseError{Desktop: desktop, Holder: l.DeviceName, Expires: l.Expires.UTC().Format(time.RFC3339),
		Err: fmt.Errorf("%w: device %s may push its user disk only; the system disk is pushed by the active device", proto.ErrNotActive, dev.Name)}
}

func validCheckin(req *proto.CheckinRequest) error {
	if !sessionIDRE.MatchString(req.ID) {
		return proto.BadRequest("check-in id %q: want 32-64 hex digits", req.ID)
	}
	if req.Base <= 0 {
		return proto.BadRequest("base version %d", req.Base)
	}
	if len(req.Disks) == 0 || len(req.Disks) > len(proto.DiskNames) {
		return proto.BadRequest("%d disks", len(req.Disks))
	}
	seen := map[string]bool{}
	for _, d := range req.Disks {
		if _, ok := proto.DiskNumber(d.Name); !ok || seen[d.Name] {
			return proto.BadRequest("disk %q", d.Name)
		}
		seen[d.Name] = true
		if d.ClusterSize < 512 || d.ClusterSize > proto.MaxClusterSize || d.ClusterSize&(d.ClusterSize-1) != 0 {
			return proto.BadRequest("disk %s: cluster size %d", d.Name, d.ClusterSize)
		}
		if d.Size <= 0 || d.Size > 1<<50 {
			return proto.BadRequest("disk %s: size %d", d.Name, d.Size)
		}
		if d.Entries < 0 || d.DataEntries < 0 || d.DataEntries > d.Entries || d.Entries > state.ClustersOf(d.Size, d.ClusterSize) {
			return proto.BadRequest("disk %s: %d entries (%d data)", d.Name, d.Entries, d.DataEntries)
		}
		if d.Parent != "" && !proto.LayerIDRE.MatchString(d.Parent) {
			return proto.BadRequest("disk %s: parent %q", d.Name, d.Parent)
		}
		if d.Entries > 0 && !proto.LayerIDRE.MatchString(d.ExpectID) {
			return proto.BadRequest("disk %s: expect_id %q", d.Name, d.ExpectID)
		}
	}
	return nil
}

func sameRequest(a, b *proto.CheckinRequest) bool {
	return a.ID == b.ID && a.Desktop == b.Desktop && a.Lease == b.Lease && a.Base == b.Base && a.Snapshot == b.Snapshot && slices.Equal(a.Disks, b.Disks)
}

func (s *Server) handleCheckinOpen(w http.ResponseWriter, r *http.Request, dev *Device) error {
	var req proto.CheckinRequest
	if err := readJSON(w, r, &req); err != nil {
		return err
	}
	if err := validCheckin(&req); err != nil {
		return err
	}
	if err := s.checkinDesktop(dev, req.Desktop); err != nil {
		return err
	}
	if old, err := s.getSession(req.ID); err == nil {
		if old.Device != dev.ID || !sameRequest(&old.CheckinRequest, &req) {
			return proto.BadRequest("check-in %s exists with other content", req.ID)
		}
		if old.Release != req.Release && old.State == proto.SessionReceiving {
			old.Release = req.Release
			if err := s.putSession(old); err != nil {
				return err
			}
		}
		st, err := s.checkinStatus(r.Context(), old)
		if err != nil {
			return err
		}
		writeJSON(w, http.StatusOK, st)
		return nil
	} else if !errors.Is(err, proto.ErrNotFound) {
		return err
	}
	if _, _, err := s.leaseForCheckin(&req, dev); err != nil {
		return err
	}
	// A parent must be a layer the desktop's versions stand on: a layer of
	// another desktop, or none at all, gets the same answer (the open tells no
	// device which layers exist).
	own, err := s.readable([]string{req.Desktop}, nil)
	if err != nil {
		return err
	}
	var need int64
	for _, d := range req.Disks {
		if d.Parent != "" && own[d.Parent] == nil && d.Entries > 0 {
			// A device under the apps policy stands on layers recomposed onto
			// its base variant: its snapshot may, its push to the head may not.
			onVariant, err := s.readableIn(dev, req.Desktop, d.Parent)
			if err != nil {
				return err
			}
			if onVariant && req.Snapshot {
				need += d.DataEntries * int64(d.ClusterSize)
				continue
			}
			if onVariant {
				return fmt.Errorf("disk %s: %w: device %s's system disk stands on the base variant of its class (policy apps): its changes are kept as a snapshot only, not pushed to the desktop's head",
					d.Name, proto.ErrNotActive, dev.Name)
			}
			return fmt.Errorf("disk %s: parent layer %s: %w among the layers of desktop %s", d.Name, state.Short(d.Parent), proto.ErrNotFound, req.Desktop)
		}
		need += d.DataEntries * int64(d.ClusterSize)
	}
	// The staging layer holds the data; it becomes the layer (no copy).
	if err := state.CheckFree(s.store.Dir(), need+16<<20); err != nil {
		return err
	}
	if open, err := s.openCheckins(dev.ID); err != nil {
		return err
	} else if len(open) >= s.opts.MaxOpenCheckins {
		return fmt.Errorf("%w: device %s has %d check-ins open (at most %d): finish one, or wait until it is reaped",
			proto.ErrTooMany, dev.Name, len(open), s.opts.MaxOpenCheckins)
	}
	se := &Session{CheckinRequest: req, Device: dev.ID, DeviceName: dev.Name, State: proto.SessionReceiving,
		Created: s.now().UTC(), Lists: []string{}, Holder: s.instance}
	if err := os.MkdirAll(s.sessionDir(req.ID), 0o700); err != nil {
		return proto.NoSpace(err)
	}
	if err := s.putSession(se); err != nil {
		return err
	}
	s.log.Info("check-in opened", "id", req.ID, "desktop", req.Desktop, "device", dev.Name, "base", req.Base)
	st, err := s.checkinStatus(r.Context(), se)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusCreated, st)
	return nil
}

func (s *Server) sessionFor(r *http.Request, dev *Device) (*Session, error) {
	se, err := s.getSession(r.PathValue("id"))
	if err != nil {
		return nil, err
	}
	if se.Device != dev.ID {
		return nil, fmt.Errorf("check-in %s: %w", se.ID, proto.ErrNotFound)
	}
	return se, nil
}

func (s *Server) checkinStatus(ctx context.Context, se *Session) (*proto.CheckinStatus, error) {
	st := &proto.CheckinStatus{ID: se.ID, State: se.State, Lists: se.Lists, Received: se.Received, Committed: se.Result}
	if se.State == proto.SessionReceiving && len(se.Lists) == len(se.Disks) {
		m, err := s.openSession(se)
		if err != nil {
			return nil, err
		}
		miss, _, err := s.missing(ctx, se, m)
		if err != nil {
			return nil, err
		}
		st.Missing = int64(len(miss))
	}
	return st, nil
}

func (s *Server) handleCheckinStatus(w http.ResponseWriter, r *http.Request, dev *Device) error {
	se, err := s.sessionFor(r, dev)
	if err != nil {
		return err
	}
	st, err := s.checkinStatus(r.Context(), se)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, st)
	return nil
}

// handleEntries stores one disk's entry list after checking it hashes to the
// declared layer ID, and creates the disk's staging layer.
func (s *Server) handleEntries(w http.ResponseWriter, r *http.Request, dev *Device) error {
	se, err := s.sessionFor(r, dev)
	if err != nil {
		return err
	}
	if se.State != proto.SessionReceiving {
		return proto.BadRequest("check-in %s is %s", se.ID, se.State)
	}
	name := r.PathValue("disk")
	i := slices.IndexFunc(se.Disks, func(d proto.CheckinDisk) bool { return d.Name == name })
	if i < 0 {
		return proto.BadRequest("disk %q is not part of check-in %s", name, se.ID)
	}
	d := se.Disks[i]
	dir := s.sessionDir(se.ID)
	tmp := filepath.Join(dir, name+".entries.tmp")
	f, err := os.OpenFile(tmp, os.O_CREATE|os.O_TRUNC|os.O_WRONLY, 0o600)
	if err != nil {
		return proto.NoSpace(err)
	}
	defer os.Remove(tmp)
	h := proto.NewIDHasher(d.Parent, d.Size, d.ClusterSize)
	var buf []byte
	body := http.MaxBytesReader(w, r.Body, d.Entries*(9+32)+1)
	err = proto.ReadEntries(body, d.Entries, state.ClustersOf(d.Size, d.ClusterSize), d.Parent != "", func(e proto.Entry) error {
		h.Add(e)
		buf = proto.AppendEntry(buf, e)
		if len(buf) >= 1<<20 {
			_, err := f.Write(buf)
			buf = buf[:0]
			return err
		}
		return nil
	})
	if err == nil {
		_, err = f.Write(buf)
	}
	if err == nil {
		err = f.Sync()
	}
	if err2 := f.Close(); err == nil {
		err = err2
	}
	if err != nil {
		return proto.NoSpace(err)
	}
	if h.Data != d.DataEntries {
		return proto.BadRequest("disk %s: %d data entries, declared %d", name, h.Data, d.DataEntries)
	}
	if d.Entries > 0 && h.Sum() != d.ExpectID {
		return proto.BadRequest("disk %s: the entry list hashes to %s, not the declared %s", name, state.Short(h.Sum()), state.Short(d.ExpectID))
	}
	if err := os.Rename(tmp, filepath.Join(dir, name+".entries")); err != nil {
		return err
	}
	if d.Entries > 0 {
		if err := s.createStage(dir, d); err != nil {
			return err
		}
	}
	err = s.st.Update(func(tx *catalog.Tx) error {
		var cur Session
		if _, err := state.GetJSON(tx, state.BucketSessions, se.ID, &cur); err != nil {
			return err
		}
		if !slices.Contains(cur.Lists, name) {
			cur.Lists = append(cur.Lists, name)
			sort.Strings(cur.Lists)
		}
		*se = cur
		return state.PutJSON(tx, state.BucketSessions, se.ID, &cur)
	})
	if err != nil {
		return err
	}
	s.dropSession(se.ID) // reload the lists
	st, err := s.checkinStatus(r.Context(), se)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, st)
	return nil
}

// createStage makes a disk's staging layer (an overlay on its parent) unless it
// exists.
func (s *Server) createStage(dir string, d proto.CheckinDisk) error {
	stage := filepath.Join(dir, d.Name+".qcow2")
	if _, err := os.Stat(stage); err == nil {
		return nil
	}
	co := disk.CreateOptions{Size: d.Size, ClusterSize: d.ClusterSize, AllowedRoots: []string{s.store.Dir()}}
	if d.Parent != "" {
		co.BackingFile = s.store.LayerPath(d.Parent)
		co.BackingFormat = disk.FormatQcow2
	}
	tmp := stage + ".tmp"
	os.Remove(tmp)
	if err := disk.CreateFile(tmp, co); err != nil {
		os.Remove(tmp)
		return proto.NoSpace(fmt.Errorf("create staging layer: %w", err))
	}
	if err := os.Rename(tmp, stage); err != nil {
		return err
	}
	s.mu.Lock()
	s.fresh[stage] = true
	s.mu.Unlock()
	return nil
}

// freshStage reports whether this process created the staging layer at path (and
// forgets it when forget is set).
func (s *Server) freshStage(path string, forget bool) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	ok := s.fresh[path]
	if forget {
		delete(s.fresh, path)
	}
	return ok
}

// openStage opens a disk's staging layer for writing, creating it when a restart
// removed it. It is written without the engine's ordering barriers (one flush per
// request): the server's restart throws away a staging layer that does not check
// clean.
func (s *Server) openStage(dir string, d proto.CheckinDisk) (disk.Image, error) {
	if err := s.createStage(dir, d); err != nil {
		return nil, err
	}
	stage := filepath.Join(dir, d.Name+".qcow2")
	img, err := disk.Open(stage, disk.OpenOptions{AllowedRoots: []string{s.store.Dir()}, NoBarriers: true, DirectData: true})
	if err != nil && !errors.Is(err, syscall.ENOSPC) {
		// Left by a commit cut while it made the staging file a layer (its
		// backing name was rewritten for the layers directory): start it over.
		s.log.Warn("dropping a staging layer that does not open", "disk", d.Name, "err", err)
		os.Remove(stage)
		s.freshStage(stage, true)
		return nil, fmt.Errorf("%w: the staging layer of disk %s did not open: its clusters will be asked for again", proto.ErrIncomplete, d.Name)
	}
	return img, err
}

// allocated lists the guest clusters the staging layer of a disk holds.
type allocSet []images.ClusterRun

func (a allocSet) has(idx int64) bool {
	i := sort.Search(len(a), func(i int) bool { return a[i].Last >= idx })
	return i < len(a) && a[i].First <= idx
}

func stageAlloc(path string, cs int) (allocSet, error) {
	img, err := disk.Open(path, disk.OpenOptions{ReadOnly: true, NoBacking: true})
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil, nil
		}
		return nil, err
	}
	defer img.Close()
	var out allocSet
	for win := int64(0); win < img.Size(); win += proto.MapWindow {
		runs, err := images.LayerRuns(img, win, min(proto.MapWindow, img.Size()-win), int64(cs))
		if err != nil {
			return nil, err
		}
		for _, r := range runs {
			if r.Data {
				out = append(out, r)
			}
		}
	}
	return out, nil
}

// source says where a data entry's bytes come from at commit.
type source struct {
	staged   bool             // received (or copied) into the staging layer at its own index
	fromDisk string           // a staged cluster of this check-in: disk and index
	fromIdx  int64            //
	ref      proto.ClusterRef // a layer the server holds (Layer "" when none)
}

// dedupSources says which layers a check-in may be deduplicated against: those
// the device may read (the chains of its desktops' versions) and the shared base
// and app layers. A cluster held only elsewhere is asked for, so the answer
// tells no device what other desktops hold. Only the layers the index names are
// looked at (each once), not every layer of the store.
func (s *Server) dedupSources(se *Session) (func(layer string) bool, error) {
	var dev *Device
	err := s.st.View(func(tx *catalog.Tx) error {
		var err error
		dev, err = oneDevice(tx, "id = ?", se.Device)
		return err
	})
	if err != nil {
		return nil, err
	}
	ok := map[string]bool{}
	if dev != nil {
		readable, err := s.readableBy(dev)
		if err != nil {
			return nil, err
		}
		for id := range readable {
			ok[id] = true
		}
	}
	return func(layer string) bool {
		if v, seen := ok[layer]; seen {
			return v
		}
		l, err := s.store.Layer(layer)
		ok[layer] = err == nil && (l.Kind == images.KindBase || l.Kind == images.KindApp)
		return ok[layer]
	}, nil
}

func (s *Server) missing(ctx context.Context, se *Session, m *session) ([]proto.MissingItem, map[string][]source, error) {
	if err := s.ensureIndexed(ctx); err != nil {
		return nil, nil, err
	}
	shared, err := s.dedupSources(se)
	if err != nil {
		return nil, nil, err
	}
	var out []proto.MissingItem
	srcs := map[string][]source{}
	type firstAt struct {
		disk string
		idx  int64
	}
	seen := map[proto.Digest]firstAt{}
	for _, d := range se.Disks {
		dl := m.lists[d.Name]
		if dl == nil || d.Entries == 0 {
			continue
		}
		alloc, err := stageAlloc(filepath.Join(m.dir, d.Name+".qcow2"), d.ClusterSize)
		if err != nil {
			return nil, nil, err
		}
		ss := make([]source, len(dl.entries))
		// The index is asked once for every digest this disk may need from it
		// (not staged already), a few hundred per query.
		var ask []proto.Digest
		for _, e := range dl.entries {
			if !e.Zero && !alloc.has(e.Index) {
				ask = append(ask, e.Digest)
			}
		}
		var refs []proto.ClusterRef
		var found []bool
		err = s.st.View(func(tx *catalog.Tx) error {
			var err error
			refs, found, err = state.LookupAll(tx, ask)
			return err
		})
		if err != nil {
			return nil, nil, err
		}
		known := make(map[proto.Digest]proto.ClusterRef, len(ask))
		for i := range ask {
			if found[i] && shared(refs[i].Layer) {
				known[ask[i]] = refs[i]
			}
		}
		for i, e := range dl.entries {
			if e.Zero {
				continue
			}
			if alloc.has(e.Index) {
				ss[i].staged = true
				if _, ok := seen[e.Digest]; !ok {
					seen[e.Digest] = firstAt{d.Name, e.Index}
				}
				continue
			}
			if f, ok := seen[e.Digest]; ok {
				ss[i].fromDisk, ss[i].fromIdx = f.disk, f.idx
				continue
			}
			if ref, ok := known[e.Digest]; ok {
				ss[i].ref = ref
				continue
			}
			seen[e.Digest] = firstAt{d.Name, e.Index}
			out = append(out, proto.MissingItem{Disk: dl.no, Index: e.Index, Digest: e.Digest})
		}
		srcs[d.Name] = ss
	}
	return out, srcs, nil
}

func (s *Server) handleMissing(w http.ResponseWriter, r *http.Request, dev *Device) error {
	se, err := s.sessionFor(r, dev)
	if err != nil {
		return err
	}
	if se.State != proto.SessionReceiving {
		w.Header().Set("Content-Type", "application/octet-stream")
		w.WriteHeader(http.StatusOK)
		return nil
	}
	if len(se.Lists) != len(se.Disks) {
		return proto.BadRequest("check-in %s: entry lists missing (have %v)", se.ID, se.Lists)
	}
	m, err := s.openSession(se)
	if err != nil {
		return err
	}
	miss, _, err := s.missing(r.Context(), se, m)
	if err != nil {
		return err
	}
	b := make([]byte, 0, len(miss)*proto.MissingItemSize)
	for _, it := range miss {
		b = proto.AppendMissing(b, it)
	}
	w.Header().Set("Content-Type", "application/octet-stream")
	w.Header().Set("X-Cvd-Missing", fmt.Sprint(len(miss)))
	w.WriteHeader(http.StatusOK)
	_, err = w.Write(b)
	return err
}

// uploadCheckpoint is how many bytes an upload writes between flushes of its
// staging layers.
const uploadCheckpoint = 64 << 20

// handleUpload receives clusters into the staging layers. Every cluster is
// checked against its digest and against the check-in's lists before it is
// written; a bad one stops the upload (the clusters before it stay staged).
func (s *Server) handleUpload(w http.ResponseWriter, r *http.Request, dev *Device) error {
	se, err := s.sessionFor(r, dev)
	if err != nil {
		return err
	}
	release, err := s.claimSession(se)
	if err != nil {
		return err
	}
	defer release()
	if se.State != proto.SessionReceiving {
		return proto.BadRequest("check-in %s is %s", se.ID, se.State)
	}
	if len(se.Lists) != len(se.Disks) {
		return proto.BadRequest("check-in %s: entry lists missing", se.ID)
	}
	m, err := s.openSession(se)
	if err != nil {
		return err
	}
	stages := map[byte]*state.StageWriter{}
	defer func() {
		for _, sw := range stages {
			sw.Close()
		}
	}()
	// listFor runs on the decoder's workers: it only reads.
	listFor := func(no byte) (*diskList, error) {
		var dl *diskList
		for _, l := range m.lists {
			if l.no == no {
				dl = l
			}
		}
		if dl == nil || dl.d.Entries == 0 {
			return nil, proto.BadRequest("cluster for disk %d, which this check-in does not change", no)
		}
		return dl, nil
	}
	// stageFor runs in stream order, on one goroutine: it opens the stages.
	stageFor := func(no byte) (*state.StageWriter, *diskList, error) {
		dl, err := listFor(no)
		if err != nil {
			return nil, nil, err
		}
		if sw := stages[no]; sw != nil {
			return sw, dl, nil
		}
		img, err := s.openStage(m.dir, dl.d)
		if err != nil {
			return nil, nil, err
		}
		sw := state.NewStageWriter(img, int64(dl.d.ClusterSize))
		stages[no] = sw
		return sw, dl, nil
	}
	var res proto.UploadResult
	var unflushed int64
	t0 := time.Now()
	body := proto.NewStreamReader(r.Body)
	_, _, err = proto.DecodeOrdered(r.Context(), body, false, nil, func(f proto.Frame, d proto.Digest) error {
		dl, err := listFor(f.Disk)
		if err != nil {
			return err
		}
		want, ok := dl.digestAt(f.Idx)
		if !ok || want != d {
			return proto.BadRequest("cluster %d of disk %s is not in the check-in's list", f.Idx, dl.d.Name)
		}
		if exp := min(int64(dl.d.ClusterSize), dl.d.Size-f.Idx*int64(dl.d.ClusterSize)); f.N != exp {
			return proto.BadRequest("cluster %d of disk %s: %d bytes, want %d", f.Idx, dl.d.Name, f.N, exp)
		}
		return nil
	}, func(f proto.Frame, _ proto.Digest, raw []byte) error {
		sw, _, err := stageFor(f.Disk)
		if err != nil {
			return err
		}
		res.Clusters++
		if err := sw.Write(f.Idx, raw); err != nil {
			return err
		}
		// Every uploadCheckpoint bytes the staging layers are flushed: what a
		// server killed in mid-upload received up to there is kept, and the
		// check-in resumes (here or on another server) from it.
		if unflushed += int64(len(raw)); unflushed >= uploadCheckpoint {
			unflushed = 0
			for _, sw := range stages {
				if err := sw.Flush(); err != nil {
					return err
				}
			}
		}
		return nil
	})
	t1 := time.Now()
	for _, sw := range stages {
		if ferr := sw.Flush(); err == nil {
			err = ferr
		}
	}
	res.Bytes = body.Bytes()
	s.log.Debug("upload received", "clusters", res.Clusters, "bytes", body.Bytes(), "took", time.Since(t0), "flush", time.Since(t1))
	s.m.bytesReceived.Add(float64(body.Bytes()))
	s.m.clustersReceived.Add(float64(res.Clusters))
	uerr := s.st.Update(func(tx *catalog.Tx) error {
		var cur Session
		if _, err := state.GetJSON(tx, state.BucketSessions, se.ID, &cur); err != nil {
			return err
		}
		cur.Received += body.Bytes()
		cur.Clusters += res.Clusters
		return state.PutJSON(tx, state.BucketSessions, se.ID, &cur)
	})
	if err != nil {
		if errors.Is(err, proto.ErrDigestMismatch) {
			s.m.digestMismatches.Add(float64(1))
		}
		return proto.NoSpace(err)
	}
	if uerr != nil {
		return uerr
	}
	writeJSON(w, http.StatusOK, res)
	return nil
}

// openCheckins lists the sessions of a device ("": of every device) still
// receiving.
func (s *Server) openCheckins(device string) ([]Session, error) {
	var out []Session
	err := s.st.View(func(tx *catalog.Tx) error {
		var err error
		out, err = receiving(tx, device)
		return err
	})
	return out, err
}

func receiving(tx *catalog.Tx, device string) ([]Session, error) {
	var out []Session
	err := tx.Bucket(state.BucketSessions).ForEach(func(k, v []byte) error {
		var se Session
		if err := json.Unmarshal(v, &se); err != nil {
			return fmt.Errorf("check-in %s: %w", k, err)
		}
		if se.State == proto.SessionReceiving && (device == "" || se.Device == device) {
			out = append(out, se)
		}
		return nil
	})
	return out, err
}

// The store's garbage collection keeps the parents of the check-ins still
// receiving: their staging layers stand on them.
func init() {
	images.RegisterKeeper(func(tx *catalog.Tx) ([]string, error) {
		open, err := receiving(tx, "")
		var out []string
		for _, se := range open {
			for _, d := range se.Disks {
				if d.Parent != "" {
					out = append(out, d.Parent)
				}
			}
		}
		return out, err
	})
}

// reapSessions removes the check-ins still receiving SessionMaxIdle after they
// were opened (their records, staging files and lists in memory), except one
// that a request is using; it returns how many it removed. One server of the
// site reaps at a time (the catalog's lock "reap"); the others skip their turn.
func (s *Server) reapSessions() (int, error) {
	release, err := s.st.DB.TryLock("reap", false)
	if errors.Is(err, catalog.ErrLocked) {
		return 0, nil
	} else if err != nil {
		return 0, err
	}
	defer release()
	open, err := s.openCheckins("")
	if err != nil {
		return 0, err
	}
	n := 0
	for _, se := range open {
		if s.now().Sub(se.Created) < s.opts.SessionMaxIdle {
			continue
		}
		if removed, err := s.removeSession(se.ID); err != nil {
			return n, err
		} else if removed {
			n++
		}
	}
	return n, nil
}
