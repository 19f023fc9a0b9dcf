package syncd

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"slices"
	"strconv"
	"time"

	"github.com/cvd-project/cvd/syncd/state"

	"github.com/cvd-project/cvd/catalog"
	"github.com/cvd-project/cvd/disk"
	"github.com/cvd-project/cvd/images"
	"github.com/cvd-project/cvd/syncd/proto"
)

// maxTTLSeconds is the largest lease length a request may ask for at all (a
// century): above it the request is refused as malformed; up to it, a length
// above the server's maximum gets the maximum.
const maxTTLSeconds = 100 * 365 * 24 * 3600

// ttl is the lease length a request asking for sec seconds gets: the server's
// default for 0, at most its maximum; a negative or absurd value is refused.
func (s *Server) ttl(sec int64) (time.Duration, error) {
	switch {
	case sec == 0:
		return s.opts.LeaseTTL, nil
	case sec < 0 || sec > maxTTLSeconds:
		return 0, proto.BadRequest("ttl_seconds %d: want 0 (the default) up to %d", sec, int64(s.opts.MaxLeaseTTL/time.Second))
	}
	return min(time.Duration(sec)*time.Second, s.opts.MaxLeaseTTL), nil
}

func (s *Server) handleCheckout(w http.ResponseWriter, r *http.Request, dev *Device) error {
	name, err := s.leaseDesktopFor(r, dev)
	if err != nil {
		return err
	}
	var req proto.CheckoutRequest
	if err := readJSON(w, r, &req); err != nil {
		return err
	}
	if len(req.Have) > proto.MaxHave {
		return proto.BadRequest("%d layers in have, at most %d", len(req.Have), proto.MaxHave)
	}
	ttl, err := s.ttl(req.TTLSeconds)
	if err != nil {
		return err
	}
	if req.Stream {
		ttl = min(ttl, s.opts.StreamLeaseTTL)
	}
	encrypt := req.Encrypt || s.opts.EncryptCopies
	if encrypt && req.Stream {
		return proto.BadRequest("an encrypted copy cannot stream: check it out whole")
	}
	m, err := s.Checkout(r.Context(), name, dev, ttl)
	if err != nil {
		return err
	}
	if encrypt {
		if err := s.st.Update(func(tx *catalog.Tx) error {
			m.Key, err = s.copyKey(tx, dev, name)
			return err
		}); err != nil {
			return err
		}
	}
	if err := s.rememberHave(m.Lease.ID, dev, req.Have); err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, m)
	return nil
}

// haveSet is what a check-out said the laptop holds (the layers of the store
// among them), for the lease's layer streams: recorded in the catalog
// (state.BucketHaves, dropped when the lease ends), since the streams may go
// to another server of the site, and cached in memory.
type haveSet struct {
	Device string          `json:"device"`
	Layers map[string]bool `json:"layers"`
}

func (s *Server) rememberHave(lease string, dev *Device, have []string) error {
	set := &haveSet{Device: dev.ID, Layers: map[string]bool{}}
	for _, id := range have {
		if proto.LayerIDRE.MatchString(id) {
			if _, err := s.store.Layer(id); err == nil {
				set.Layers[id] = true
			}
		}
	}
	err := s.st.Update(func(tx *catalog.Tx) error {
		if len(set.Layers) == 0 {
			return tx.Bucket(state.BucketHaves).Delete([]byte(lease))
		}
		return state.PutJSON(tx, state.BucketHaves, lease, set)
	})
	if err != nil {
		return err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(set.Layers) == 0 {
		delete(s.haves, lease)
	} else {
		s.haves[lease] = set
	}
	return nil
}

// haveOf is the have set of a lease: cached, or read from the catalog (a
// check-out through another server); nil when there is none.
func (s *Server) haveOf(lease string) *haveSet {
	s.mu.Lock()
	set := s.haves[lease]
	s.mu.Unlock()
	if set != nil {
		return set
	}
	var rec haveSet
	var ok bool
	s.st.View(func(tx *catalog.Tx) error {
		ok, _ = state.GetJSON(tx, state.BucketHaves, lease, &rec)
		return nil
	})
	if !ok {
		return nil
	}
	s.mu.Lock()
	s.haves[lease] = &rec
	s.mu.Unlock()
	return &rec
}

// refsFor returns, for a stream of layer id asked for with lease, the lookup that
// turns a cluster the laptop holds into a reference; nil when there is none.
func (s *Server) refsFor(lease string, dev *Device, id string) func(proto.Digest) (proto.ClusterRef, bool) {
	if lease == "" {
		return nil
	}
	set := s.haveOf(lease)
	if set == nil || set.Device != dev.ID {
		return nil
	}
	return func(d proto.Digest) (proto.ClusterRef, bool) {
		var ref proto.ClusterRef
		var ok bool
		s.st.View(func(tx *catalog.Tx) error {
			ref, ok = state.Lookup(tx, d)
			return nil
		})
		return ref, ok && ref.Layer != id && set.Layers[ref.Layer]
	}
}

// Checkout gives dev the desktop's lease (renewing the one it holds), stops the
// server-side VM, seals the server's tops as a new version when they hold data, and
// returns the manifest of the head version. Another device's unexpired lease
// refuses it with a *LeaseError and changes nothing.
func (s *Server) Checkout(ctx context.Context, name string, dev *Device, ttl time.Duration) (*proto.Manifest, error) {
	unlock, err := s.lockDesktop(ctx, name)
	if err != nil {
		return nil, err
	}
	defer unlock()
	now := s.now()
	// Refuse early, before the VM is touched.
	if _, err := desktopVersions(s.store, name); err != nil {
		return nil, err
	}
	if err := mayBeActive(dev, name); err != nil {
		return nil, err
	}
	err = s.st.View(func(tx *catalog.Tx) error {
		l, err := activeLease(tx, name)
		if err != nil {
			return err
		}
		if l != nil && l.Device != dev.ID && !l.Expired(now) {
			return leaseHeld(l, proto.ErrLeaseHeld)
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	m := &proto.Manifest{Desktop: name}
	if s.opts.VM != nil {
		stopped, err := s.opts.VM.StopDesktop(ctx, name, s.opts.StopTimeout)
		if err != nil {
			return nil, fmt.Errorf("desktop %s: stop the server-side VM: %w", name, err)
		}
		m.VMStopped = stopped
		if stopped {
			s.log.Info("stopped server-side VM for check-out", "desktop", name, "device", dev.Name)
		}
	}
	m.Sealed, err = s.sealServerTops(ctx, name, "check-out seal")
	if err != nil {
		return nil, err
	}
	if s.opts.BeforeCheckout != nil {
		if err := s.opts.BeforeCheckout(ctx, name); err != nil {
			return nil, fmt.Errorf("desktop %s: before check-out: %w", name, err)
		}
	}
	dv, err := desktopVersions(s.store, name)
	if err != nil {
		return nil, err
	}
	var fresh bool
	err = s.st.Update(func(tx *catalog.Tx) error {
		l, f, err := grantLease(tx, name, dev, ttl, dv.Head, s.now())
		if err != nil {
			return err
		}
		m.Lease, fresh = *l, f
		return nil
	})
	if err != nil {
		return nil, err
	}
	if fresh {
		s.m.checkouts.Add(float64(1))
		s.log.Info("lease granted", "desktop", name, "device", dev.Name, "expires", m.Lease.Expires, "version", dv.Head)
	}
	m.Version = dv.Head
	if err := s.deviceDisks(ctx, m, dv, dev); err != nil {
		return nil, err
	}
	return m, nil
}

// handleManifest answers the head version's layers as the device holds them
// (its policy), without a lease: what a host pulls to provision clones of the
// desktop, and what an inactive device of the desktop's group stages.
func (s *Server) handleManifest(w http.ResponseWriter, r *http.Request, dev *Device) error {
	name, err := s.desktopFor(r, dev)
	if err != nil {
		return err
	}
	dv, err := desktopVersions(s.store, name)
	if err != nil {
		return err
	}
	m := &proto.Manifest{Desktop: name, Version: dv.Head}
	if err := s.deviceDisks(r.Context(), m, dv, dev); err != nil {
		return err
	}
	s.m.pulls.Add(1)
	writeJSON(w, http.StatusOK, m)
	return nil
}

// fillDisks lists the chains of the head version's disks.
func (s *Server) fillDisks(m *proto.Manifest, dv *DesktopVersions) error {
	head := dv.HeadVersion()
	for _, dn := range proto.DiskNames {
		id := state.LayerOf(head, dn)
		if dn == proto.DiskUser && id == "" && dv.UserDisk == "" {
			continue
		}
		dm := proto.DiskManifest{Name: dn}
		if id == "" {
			dm.BlankSize = dv.UserSize
		} else {
			chain, err := s.store.Chain(id)
			if err != nil {
				return err
			}
			for i := range chain {
				dm.Layers = append(dm.Layers, proto.LayerInfoOf(&chain[i]))
			}
		}
		m.Disks = append(m.Disks, dm)
	}
	return nil
}

func (s *Server) handleRenew(w http.ResponseWriter, r *http.Request, dev *Device) error {
	name, err := s.leaseDesktopFor(r, dev)
	if err != nil {
		return err
	}
	var req proto.LeaseRequest
	if err := readJSON(w, r, &req); err != nil {
		return err
	}
	ttl, err := s.ttl(req.TTLSeconds)
	if err != nil {
		return err
	}
	if req.Stream {
		ttl = min(ttl, s.opts.StreamLeaseTTL)
	}
	var l *proto.Lease
	err = s.st.Update(func(tx *catalog.Tx) error {
		var err error
		l, err = ownLease(tx, name, dev, req.Lease, s.now())
		if err != nil {
			return err
		}
		l.Expires = leaseTime(s.now().Add(ttl))
		return putLease(tx, l)
	})
	if err != nil {
		return err
	}
	s.log.Info("lease renewed", "desktop", name, "device", dev.Name, "expires", l.Expires)
	writeJSON(w, http.StatusOK, l)
	return nil
}

func (s *Server) handleRelease(w http.ResponseWriter, r *http.Request, dev *Device) error {
	name, err := s.leaseDesktopFor(r, dev)
	if err != nil {
		return err
	}
	var req proto.LeaseRequest
	if err := readJSON(w, r, &req); err != nil {
		return err
	}
	err = s.st.Update(func(tx *catalog.Tx) error {
		l, err := ownLease(tx, name, dev, req.Lease, s.now())
		if err != nil {
			return err
		}
		return endLease(tx, l, "released", s.now())
	})
	if err != nil {
		return err
	}
	s.log.Info("lease released", "desktop", name, "device", dev.Name)
	writeJSON(w, http.StatusOK, map[string]string{"released": req.Lease})
	return nil
}

// layerFor checks that the layer in the path belongs to a version of a desktop
// dev is bound to, and returns its record.
func (s *Server) layerFor(r *http.Request, dev *Device) (*images.Layer, error) {
	id := r.PathValue("id")
	if !proto.LayerIDRE.MatchString(id) {
		return nil, proto.BadRequest("layer id %q: want 64 hex digits", id)
	}
	if dev.Host() {
		// A host of the site reads any sealed layer (they are immutable).
		l, err := s.store.Layer(id)
		if errors.Is(err, images.ErrNotFound) {
			return nil, fmt.Errorf("layer %s: %w", state.Short(id), proto.ErrNotFound)
		}
		return l, err
	}
	readable, err := s.readableBy(dev)
	if err != nil {
		return nil, err
	}
	if l := readable[id]; l != nil {
		return l, nil
	}
	return nil, fmt.Errorf("layer %s: %w among the desktops of device %s", state.Short(id), proto.ErrNotFound, dev.Name)
}

// readable is the set of layers that the desktops' versions stand on: every
// layer in the chain of a version of one of them (of their user disks alone
// for the desktops in userOnly). A device reads only those of the desktops it
// is bound to, and a check-in's parent must be one of its own desktop's.
func (s *Server) readable(desktops []string, userOnly map[string]bool) (map[string]*images.Layer, error) {
	var tops []string
	for _, name := range desktops {
		dv, err := desktopVersions(s.store, name)
		if err != nil {
			if errors.Is(err, images.ErrNotFound) {
				continue
			}
			return nil, err
		}
		for _, v := range dv.Versions {
			if !userOnly[name] {
				tops = append(tops, v.System)
			}
			tops = append(tops, v.User)
		}
	}
	slices.Sort(tops)
	return s.store.Chains(slices.Compact(tops))
}

func (s *Server) handleLayer(w http.ResponseWriter, r *http.Request, dev *Device) error {
	l, err := s.layerFor(r, dev)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, proto.LayerInfoOf(l))
	return nil
}

// handleClusters streams a layer's clusters from index "from" on (see wire.go).
func (s *Server) handleClusters(w http.ResponseWriter, r *http.Request, dev *Device) error {
	l, err := s.layerFor(r, dev)
	if err != nil {
		return err
	}
	var from int64
	if f := r.URL.Query().Get("from"); f != "" {
		from, err = strconv.ParseInt(f, 10, 64)
		if err != nil || from < 0 {
			return proto.BadRequest("from=%q", f)
		}
	}
	// The store's garbage collection leaves a layer alone while it is read.
	release, err := s.st.DB.TryLock(images.LayerLockKey(l.ID), true)
	if errors.Is(err, catalog.ErrLocked) {
		return fmt.Errorf("layer %s: %w (being removed)", state.Short(l.ID), proto.ErrNotFound)
	} else if err != nil {
		return err
	}
	defer release()
	img, err := s.store.OpenLayer(l.ID, true)
	if err != nil {
		return err
	}
	defer img.Close()
	w.Header().Set("Content-Type", "application/x-cvd-clusters")
	w.Header().Set("X-Cvd-Layer", l.ID)
	w.WriteHeader(http.StatusOK)
	sw := proto.NewStreamWriter(w)
	opts := proto.EncodeOptions{Compress: true, RefOf: s.refsFor(r.URL.Query().Get("lease"), dev, l.ID)}
	n, err := writeLayerStream(r.Context(), sw, img, l.ClusterSize, l.Parent != "", from, l.ID, opts)
	s.m.bytesSent.Add(float64(sw.Bytes))
	s.m.clustersSent.Add(float64(n))
	if err != nil {
		// The status is sent: the client sees a stream without its end frame.
		s.log.Warn("layer stream cut", "layer", state.Short(l.ID), "device", dev.Name, "err", err)
		return nil
	}
	return nil
}

// writeLayerStream writes img's own clusters from index from on as frames, then the
// end frame with the layer ID, and returns the number of entries sent.
func writeLayerStream(ctx context.Context, sw *proto.StreamWriter, img disk.Image, cs int, keepZero bool, from int64, id string, opts proto.EncodeOptions) (int64, error) {
	var entries int64
	zeros := proto.ZeroRun{Write: func(start, n int64) error { return sw.Zeros(0, start, n) }}
	err := proto.EncodeOrdered(ctx, opts, func(submit func(byte, int64, []byte, *proto.Digest) error) error {
		return images.WalkLayerFrom(ctx, img, cs, keepZero, from, func(idx int64, data []byte) error {
			return submit(0, idx, data, nil)
		})
	}, func(c proto.EncodedCluster, zero bool) error {
		entries++
		if zero {
			return zeros.Add(c.Idx, 1)
		}
		if err := zeros.Flush(); err != nil {
			return err
		}
		if c.Ref != nil {
			return sw.Reference(c)
		}
		return sw.Data(c)
	})
	if err == nil {
		err = zeros.Flush()
	}
	if err != nil {
		return entries, err
	}
	raw, err := proto.HexID(id)
	if err != nil {
		return entries, err
	}
	return entries, sw.End(entries, raw)
}
