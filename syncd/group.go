package syncd

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"slices"
	"time"

	"github.com/cvd-project/cvd/catalog"
	"github.com/cvd-project/cvd/desktop"
	"github.com/cvd-project/cvd/images"
	"github.com/cvd-project/cvd/syncd/proto"
	"github.com/cvd-project/cvd/syncd/state"
)

// A desktop's device group: the devices bound to it, each with a policy that
// says which of its layers it holds (full, apps, user), and at most one of
// them active (the holder of the desktop's lease: it alone moves the system
// disk). The others follow: they stage the head as their policy covers it.

// deviceDisks lists in m the chains of the head version's disks as dev holds
// them: all of them under the full policy (and for a host outside the group),
// the user disk alone under the user policy, and under the apps policy the
// system disk recomposed onto the base variant of dev's hardware class.
func (s *Server) deviceDisks(ctx context.Context, m *proto.Manifest, dv *DesktopVersions, dev *Device) error {
	if err := s.fillDisks(m, dv); err != nil {
		return err
	}
	m.Boot = dv.Boot
	m.Policy = proto.PolicyFull
	b := dev.Binding(m.Desktop)
	if b == nil {
		return nil
	}
	m.Policy = b.Policy
	switch b.Policy {
	case proto.PolicyUser:
		m.Disks = slices.DeleteFunc(m.Disks, func(d proto.DiskManifest) bool { return d.Name == proto.DiskSystem })
	case proto.PolicyApps:
		head := dv.HeadVersion()
		v, err := desktop.VariantFor(s.store, dev.Class, head.System)
		if err != nil {
			return fmt.Errorf("device %s: %w", dev.Name, err)
		}
		vc, err := desktop.OnVariant(ctx, s.store, head.System, *v)
		if err != nil {
			return proto.NoSpace(err)
		}
		if vc.Made > 0 {
			s.log.Info("recomposed onto a base variant", "desktop", m.Desktop, "class", v.Class, "variant", images.ShortID(v.Layer),
				"layers", vc.Made, "bytes", vc.Bytes, "conflict_clusters", vc.Conflicts)
			s.indexLater(vc.System)
		}
		chain, err := s.store.Chain(vc.System)
		if err != nil {
			return err
		}
		for i := range m.Disks {
			if m.Disks[i].Name != proto.DiskSystem {
				continue
			}
			m.Disks[i].Layers = m.Disks[i].Layers[:0]
			for j := range chain {
				m.Disks[i].Layers = append(m.Disks[i].Layers, proto.LayerInfoOf(&chain[j]))
			}
		}
		m.Variant = &proto.VariantChain{Class: v.Class, Base: v.Base, Layer: v.Layer, Made: vc.Made, ConflictClusters: vc.Conflicts}
	}
	return nil
}

// readableBy is what dev may read: the layers its desktops' versions stand
// on (readable) as its policy in each covers them (under the user policy, the
// user disk's alone; under the apps policy, the user disk's, and the system
// disk's recomposed onto the base variant of its hardware class, with the
// variant's chain).
func (s *Server) readableBy(dev *Device) (map[string]*images.Layer, error) {
	narrow := map[string]bool{}
	for _, b := range dev.Bindings {
		narrow[b.Desktop] = b.Policy == proto.PolicyUser || b.Policy == proto.PolicyApps
	}
	rd, err := s.readable(dev.Desktops, narrow)
	if err != nil || dev.Class == "" || !slices.ContainsFunc(dev.Bindings, func(b Binding) bool { return b.Policy == proto.PolicyApps }) {
		return rd, err
	}
	// The layers the recomposed ones copy are those of the apps bindings'
	// system disks.
	var apps []string
	for _, b := range dev.Bindings {
		if b.Policy == proto.PolicyApps {
			apps = append(apps, b.Desktop)
		}
	}
	sys, err := s.readable(apps, nil)
	if err != nil {
		return nil, err
	}
	var made []string
	err = s.st.View(func(tx *catalog.Tx) error {
		from, mk, err := desktop.RecomposedLayers(tx, dev.Class)
		for i := range from {
			if sys[from[i]] != nil {
				made = append(made, mk[i])
			}
		}
		return err
	})
	if err != nil || len(made) == 0 {
		return rd, err
	}
	slices.Sort(made)
	more, err := s.store.Chains(slices.Compact(made))
	if err != nil {
		return nil, err
	}
	for id, l := range more {
		rd[id] = l
	}
	return rd, nil
}

// readableIn reports whether dev may read layer id through its binding to
// desktop alone.
func (s *Server) readableIn(dev *Device, desktop, id string) (bool, error) {
	b := dev.Binding(desktop)
	if b == nil {
		return false, nil
	}
	one := *dev
	one.Desktops, one.Bindings = []string{desktop}, []Binding{*b}
	rd, err := s.readableBy(&one)
	return rd[id] != nil, err
}

// handleBootFile sends one of the files the desktop boots from (GET
// /v1/desktops/{d}/boot/{sha256}): only those its boot configuration names.
func (s *Server) handleBootFile(w http.ResponseWriter, r *http.Request, dev *Device) error {
	name, err := s.desktopFor(r, dev)
	if err != nil {
		return err
	}
	sum := r.PathValue("sum")
	d, err := s.store.Desktop(name)
	if err != nil {
		return err
	}
	if d.Boot == nil || !slices.Contains(d.Boot.Files(), sum) {
		return fmt.Errorf("boot file %q: %w among those of desktop %s", sum, proto.ErrNotFound, name)
	}
	f, err := os.Open(s.store.BootFile(sum))
	if err != nil {
		return err
	}
	defer f.Close()
	w.Header().Set("Content-Type", "application/octet-stream")
	_, err = io.Copy(w, f)
	return err
}

// handleDeviceReport records what a device runs and has staged of a desktop
// (PUT /v1/desktops/{d}/device), and when it said so.
func (s *Server) handleDeviceReport(w http.ResponseWriter, r *http.Request, dev *Device) error {
	name, err := s.desktopFor(r, dev)
	if err != nil {
		return err
	}
	var rep proto.DeviceReport
	if err := readJSON(w, r, &rep); err != nil {
		return err
	}
	if rep.Runs < 0 || rep.Staged < 0 || rep.Fetched < -1 {
		return proto.BadRequest("versions %d, %d, %d bytes", rep.Runs, rep.Staged, rep.Fetched)
	}
	if err := checkClass(rep.Class); err != nil {
		return err
	}
	err = s.st.Update(func(tx *catalog.Tx) error {
		seen := s.now().UTC().Truncate(time.Microsecond)
		if rep.Class != "" {
			// A class given at the registration (or since) wins over the detected one.
			if _, err := tx.Exec("UPDATE devices SET class = ? WHERE id = ? AND class = ''", rep.Class, dev.ID); err != nil {
				return err
			}
		}
		// Fetched -1: the last update's bytes stay.
		_, err := tx.Exec("UPDATE device_desktops SET runs = ?, staged = ?, fetched = CASE WHEN ? < 0 THEN fetched ELSE ? END, seen = ?"+
			" WHERE device = ? AND desktop = ?", rep.Runs, rep.Staged, rep.Fetched, rep.Fetched, seen, dev.ID, name)
		return err
	})
	if err != nil {
		return err
	}
	w.WriteHeader(http.StatusNoContent)
	return nil
}

// GroupMember is one device of a desktop's group as `cvd desktop devices`
// shows it.
type GroupMember struct {
	Device string    `json:"device"`
	Kind   string    `json:"kind"`
	Class  string    `json:"class,omitempty"`
	Policy string    `json:"policy"`
	Role   string    `json:"role"` // active, inactive
	Runs   int       `json:"runs,omitempty"`
	Staged int       `json:"staged,omitempty"`
	Seen   time.Time `json:"seen,omitzero"`
	// Fetched is the stream bytes its last update received.
	Fetched int64 `json:"fetched_bytes"`
	// Lease is the active device's lease expiry.
	Lease time.Time `json:"lease_expires,omitzero"`
}

// DesktopDevices lists the devices of a desktop's group: policy, class, role,
// what each runs and has staged, and when it was last seen.
func (s *Server) DesktopDevices(name string) ([]GroupMember, error) {
	if _, err := s.store.Desktop(name); err != nil {
		return nil, err
	}
	var out []GroupMember
	err := s.st.View(func(tx *catalog.Tx) error {
		ds, err := queryDevices(tx, "id IN (SELECT device FROM device_desktops WHERE desktop = ?)", name)
		if err != nil {
			return err
		}
		l, err := activeLease(tx, name)
		if err != nil {
			return err
		}
		for _, d := range ds {
			b := d.Binding(name)
			if b == nil {
				continue
			}
			g := GroupMember{Device: d.Name, Kind: d.Kind, Class: d.Class, Policy: b.Policy, Role: "inactive",
				Runs: b.Runs, Staged: b.Staged, Seen: b.Seen, Fetched: b.Fetched}
			if l != nil && l.Device == d.ID && !l.Expired(s.now()) {
				g.Role, g.Lease = "active", l.Expires
			}
			out = append(out, g)
		}
		return nil
	})
	return out, err
}

// mayBeActive refuses the active role to a device that holds the user disk of
// the desktop alone.
func mayBeActive(dev *Device, desktop string) error {
	if b := dev.Binding(desktop); b != nil && b.Policy == proto.PolicyUser {
		return fmt.Errorf("%w: device %s holds the user disk of %s alone (policy user): it cannot be the active device",
			proto.ErrForbidden, dev.Name, desktop)
	}
	return nil
}

// maxOpenWait bounds how long a device may ask the active one to step down.
const maxOpenWait = time.Hour

// handleOpen answers a device that asks for the desktop's active role (POST
// /v1/desktops/{d}/open). The role is free when no unexpired lease is held, or
// when the asking device holds it; the asker then takes it with a check-out.
// While another device holds it, the request is noted on the holder's lease
// (its agent sees it at its next poll, syncs up and releases the lease) and
// the answer is "waiting"; once the wait has passed, the holder's lease is
// broken: its later check-in is kept as a conflict version.
func (s *Server) handleOpen(w http.ResponseWriter, r *http.Request, dev *Device) error {
	name, err := s.leaseDesktopFor(r, dev)
	if err != nil {
		return err
	}
	var req proto.OpenRequest
	if err := readJSON(w, r, &req); err != nil {
		return err
	}
	if req.WaitSeconds < 0 || req.WaitSeconds > int64(maxOpenWait/time.Second) {
		return proto.BadRequest("wait_seconds %d: want 0 to %d", req.WaitSeconds, int64(maxOpenWait/time.Second))
	}
	if req.On != "" || req.Remote {
		ans, err := s.openOn(name, dev, req)
		if err != nil {
			return err
		}
		writeJSON(w, http.StatusOK, ans)
		return nil
	}
	if err := mayBeActive(dev, name); err != nil {
		return err
	}
	ans, err := s.Open(r.Context(), name, dev, time.Duration(req.WaitSeconds)*time.Second, req.Force, req.Check)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, ans)
	return nil
}

// Open is handleOpen's work.
func (s *Server) Open(ctx context.Context, name string, dev *Device, wait time.Duration, force, check bool) (*proto.OpenAnswer, error) {
	unlock, err := s.lockDesktop(ctx, name)
	if err != nil {
		return nil, err
	}
	defer unlock()
	ans := &proto.OpenAnswer{State: "free"}
	now := s.now()
	minGap := s.opts.MinRoleInterval
	err = s.st.Update(func(tx *catalog.Tx) error {
		l, err := activeLease(tx, name)
		if err != nil || l == nil || l.Expired(now) || l.Device == dev.ID {
			return err
		}
		ans.Holder = l.DeviceName
		if !force && minGap > 0 && now.Sub(l.Granted) < minGap {
			return fmt.Errorf("desktop %s: %w: device %s became active at %s; ask again after %s (or force it)",
				name, proto.ErrTooSoon, l.DeviceName, l.Granted.Format(time.RFC3339), l.Granted.Add(minGap).Format(time.RFC3339))
		}
		if check {
			ans.State = "waiting"
			return nil
		}
		if l.HandoverTo != dev.Name {
			l.HandoverTo, l.HandoverAt = dev.Name, now
			ans.State, ans.Deadline = "waiting", now.Add(wait)
			if wait == 0 {
				// No wait: the holder's lease is broken at once.
				ans.State, ans.Broken = "free", true
				return endLease(tx, l, "broken", now)
			}
			return putLease(tx, l)
		}
		ans.Deadline = l.HandoverAt.Add(wait)
		if now.Before(ans.Deadline) {
			ans.State = "waiting"
			return nil
		}
		ans.Broken = true
		return endLease(tx, l, "broken", now)
	})
	if err != nil {
		return nil, err
	}
	switch {
	case ans.Broken:
		s.log.Warn("active role taken after the wait: lease broken", "desktop", name, "holder", ans.Holder, "device", dev.Name)
	case ans.State == "waiting":
		s.log.Info("active role asked for: the holder is told to step down", "desktop", name, "holder", ans.Holder, "device", dev.Name)
	}
	return ans, nil
}

// openOn records that dev asks device req.On (of the desktop's group) to open
// the desktop and run it. That device's agent sees it in the desktop's status
// and opens it (asking the active device to step down as any opener does).
func (s *Server) openOn(name string, dev *Device, req proto.OpenRequest) (*proto.OpenAnswer, error) {
	var target *Device
	err := s.st.Update(func(tx *catalog.Tx) error {
		var err error
		if req.On == "" {
			hosts, err := queryDevices(tx, "kind = ? AND id IN (SELECT device FROM device_desktops WHERE desktop = ?)", KindHost, name)
			if err != nil {
				return err
			}
			if len(hosts) != 1 {
				return fmt.Errorf("desktop %s: %w: its device group has %d hosts; name the device that is to run it", name, proto.ErrNotFound, len(hosts))
			}
			req.On = hosts[0].Name
		}
		if target, err = deviceByName(tx, req.On); err != nil {
			return err
		}
		if !target.Bound(name) {
			return fmt.Errorf("device %s: %w: it is not in the device group of %s", req.On, proto.ErrForbidden, name)
		}
		if err := mayBeActive(target, name); err != nil {
			return err
		}
		if req.Check {
			return nil
		}
		r := proto.RemoteOpen{Device: target.Name, DeviceID: target.ID, By: dev.Name, Requested: s.now().UTC(), WaitSeconds: req.WaitSeconds}
		return state.PutJSON(tx, state.BucketRemote, name, &r)
	})
	if err != nil {
		return nil, err
	}
	if !req.Check {
		s.log.Info("asked a device to run the desktop", "desktop", name, "device", target.Name, "by", dev.Name)
	}
	return &proto.OpenAnswer{State: "requested", Holder: target.Name}, nil
}

// handleConsole takes the console address of the device that was asked to
// run the desktop (PUT /v1/desktops/{d}/console), or why it could not.
func (s *Server) handleConsole(w http.ResponseWriter, r *http.Request, dev *Device) error {
	name, err := s.desktopFor(r, dev)
	if err != nil {
		return err
	}
	var rep proto.ConsoleReport
	if err := readJSON(w, r, &rep); err != nil {
		return err
	}
	if len(rep.Console) > 512 || len(rep.Error) > 4096 {
		return proto.BadRequest("console report too long")
	}
	err = s.st.Update(func(tx *catalog.Tx) error {
		var ro proto.RemoteOpen
		if ok, err := state.GetJSON(tx, state.BucketRemote, name, &ro); err != nil {
			return err
		} else if !ok || ro.DeviceID != dev.ID {
			return fmt.Errorf("%w: device %s was not asked to run desktop %s", proto.ErrForbidden, dev.Name, name)
		}
		ro.Console, ro.Error, ro.Opened = rep.Console, rep.Error, s.now().UTC()
		return state.PutJSON(tx, state.BucketRemote, name, &ro)
	})
	if err != nil {
		return err
	}
	s.log.Info("desktop runs on a device", "desktop", name, "device", dev.Name, "console", rep.Console, "error", rep.Error)
	w.WriteHeader(http.StatusNoContent)
	return nil
}
