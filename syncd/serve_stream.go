package syncd

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strconv"

	"github.com/cvd-project/cvd/catalog"
	"github.com/cvd-project/cvd/disk"
	"github.com/cvd-project/cvd/images"
	"github.com/cvd-project/cvd/internal/fsutil"
	"github.com/cvd-project/cvd/syncd/proto"
	"github.com/cvd-project/cvd/syncd/state"
)

// What a streaming check-out reads (see the laptop's stream): a layer's entry
// list, made once and kept in <store>/sync/entries, clusters by index, and the
// layer's working set.

// openLayerLocked opens a layer for reading under the lock that keeps the
// store's gc away from it.
func (s *Server) openLayerLocked(l *images.Layer) (disk.Image, func(), error) {
	release, err := s.st.DB.TryLock(images.LayerLockKey(l.ID), true)
	if errors.Is(err, catalog.ErrLocked) {
		return nil, nil, fmt.Errorf("layer %s: %w (being removed)", state.Short(l.ID), proto.ErrNotFound)
	} else if err != nil {
		return nil, nil, err
	}
	img, err := s.store.OpenLayer(l.ID, true)
	if err != nil {
		release()
		return nil, nil, err
	}
	return img, func() { img.Close(); release() }, nil
}

// handleLayerEntries answers GET /v1/layers/{id}/entries: the layer's entry
// list (proto.AppendEntry, ascending), which hashes to its ID.
func (s *Server) handleLayerEntries(w http.ResponseWriter, r *http.Request, dev *Device) error {
	l, err := s.layerFor(r, dev)
	if err != nil {
		return err
	}
	path, err := s.entryList(r.Context(), l)
	if err != nil {
		return err
	}
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return err
	}
	w.Header().Set("Content-Type", "application/x-cvd-entries")
	w.Header().Set("Content-Length", strconv.FormatInt(fi.Size(), 10))
	w.Header().Set("X-Cvd-Entries", strconv.FormatInt(l.Clusters, 10))
	w.WriteHeader(http.StatusOK)
	n, _ := io.Copy(w, f)
	s.m.bytesSent.Add(float64(n))
	return nil
}

// entryList returns the path of layer l's entry list, made from the layer's
// clusters the first time (one at a time: a list is made once).
func (s *Server) entryList(ctx context.Context, l *images.Layer) (string, error) {
	dir := filepath.Join(s.st.Dir, state.EntriesDir)
	path := filepath.Join(dir, l.ID)
	if _, err := os.Stat(path); err == nil {
		return path, nil
	}
	s.entriesMu.Lock()
	defer s.entriesMu.Unlock()
	if _, err := os.Stat(path); err == nil {
		return path, nil
	}
	img, done, err := s.openLayerLocked(l)
	if err != nil {
		return "", err
	}
	defer done()
	var b bytes.Buffer
	h := proto.NewIDHasher(l.Parent, l.Size, l.ClusterSize)
	err = images.SumLayer(ctx, img, l.ClusterSize, l.Parent != "", func(cs images.ClusterSum) error {
		e := proto.Entry{Index: cs.Index, Zero: cs.Zero, Digest: cs.Digest}
		h.Add(e)
		b.Write(proto.AppendEntry(nil, e))
		return nil
	})
	if err != nil {
		return "", err
	}
	if h.Sum() != l.ID {
		return "", fmt.Errorf("layer %s: %w: its clusters hash to %s", state.Short(l.ID), proto.ErrDigestMismatch, state.Short(h.Sum()))
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", proto.NoSpace(err)
	}
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, b.Bytes(), 0o644); err != nil {
		os.Remove(tmp)
		return "", proto.NoSpace(err)
	}
	if err := fsutil.Sync(tmp); err != nil {
		os.Remove(tmp)
		return "", err
	}
	return path, os.Rename(tmp, path)
}

// handleLayerRead answers POST /v1/layers/{id}/read: the body names clusters
// (8-byte big-endian indexes, ascending, at most proto.MaxRead); the answer is
// a cluster stream with a data frame for each that the layer holds as data, a
// one-cluster zero run for any other, and an end frame (the count, no ID).
func (s *Server) handleLayerRead(w http.ResponseWriter, r *http.Request, dev *Device) error {
	l, err := s.layerFor(r, dev)
	if err != nil {
		return err
	}
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, 8*proto.MaxRead+1))
	if err != nil || len(body)%8 != 0 || len(body) == 0 || len(body) > 8*proto.MaxRead {
		return proto.BadRequest("read: want 1 to %d cluster indexes of 8 bytes", proto.MaxRead)
	}
	clusters := state.ClustersOf(l.Size, l.ClusterSize)
	idxs := make([]int64, len(body)/8)
	for i := range idxs {
		idxs[i] = int64(binary.BigEndian.Uint64(body[8*i:]))
		if idxs[i] < 0 || idxs[i] >= clusters || (i > 0 && idxs[i] <= idxs[i-1]) {
			return proto.BadRequest("read: index %d out of order or beyond the layer's %d clusters", idxs[i], clusters)
		}
	}
	img, done, err := s.openLayerLocked(l)
	if err != nil {
		return err
	}
	defer done()
	w.Header().Set("Content-Type", "application/x-cvd-clusters")
	w.WriteHeader(http.StatusOK)
	sw := proto.NewStreamWriter(w)
	cs := int64(l.ClusterSize)
	var n int64
	buf := make([]byte, cs)
	err = proto.EncodeOrdered(r.Context(), proto.EncodeOptions{Compress: true}, func(submit func(byte, int64, []byte, *proto.Digest) error) error {
		for _, idx := range idxs {
			off := idx * cs
			ln := min(cs, l.Size-off)
			ext, err := img.MapLayer(off, ln)
			if err != nil {
				return err
			}
			if len(ext) != 1 || ext[0].State != disk.Data {
				if err := submit(0, idx, nil, nil); err != nil {
					return err
				}
				continue
			}
			if _, err := img.ReadAt(buf[:ln], off); err != nil && err != io.EOF {
				return err
			}
			if err := submit(0, idx, buf[:ln], nil); err != nil {
				return err
			}
		}
		return nil
	}, func(c proto.EncodedCluster, zero bool) error {
		n++
		if zero {
			return sw.Zeros(0, c.Idx, 1)
		}
		return sw.Data(c)
	})
	if err == nil {
		err = sw.End(n, make([]byte, 32))
	}
	s.m.bytesSent.Add(float64(sw.Bytes))
	s.m.clustersSent.Add(float64(n))
	if err != nil {
		s.log.Warn("cluster read cut", "layer", state.Short(l.ID), "device", dev.Name, "err", err)
	}
	return nil
}

// handleWorkingSet answers GET and PUT /v1/layers/{id}/workingset.
func (s *Server) handleWorkingSet(w http.ResponseWriter, r *http.Request, dev *Device) error {
	l, err := s.layerFor(r, dev)
	if err != nil {
		return err
	}
	if r.Method == http.MethodGet {
		ws, err := s.WorkingSet(l.ID)
		if err != nil {
			return err
		}
		writeJSON(w, http.StatusOK, ws)
		return nil
	}
	var add proto.WorkingSet
	if err := readJSON(w, r, &add); err != nil {
		return err
	}
	clusters := state.ClustersOf(l.Size, l.ClusterSize)
	if len(add.Clusters) > proto.MaxWorkingSet {
		return proto.BadRequest("%d clusters in a working set, at most %d", len(add.Clusters), proto.MaxWorkingSet)
	}
	for _, c := range add.Clusters {
		if c < 0 || c >= clusters {
			return proto.BadRequest("working set: cluster %d beyond the layer's %d", c, clusters)
		}
	}
	var out proto.WorkingSet
	err = s.st.Update(func(tx *catalog.Tx) error {
		if _, err := state.GetJSON(tx, state.BucketWorking, l.ID, &out); err != nil {
			return err
		}
		out.Clusters = MergeWorkingSet(out.Clusters, add.Clusters, proto.MaxWorkingSet)
		out.Devices++
		return state.PutJSON(tx, state.BucketWorking, l.ID, &out)
	})
	if err != nil {
		return err
	}
	s.log.Info("working set reported", "layer", state.Short(l.ID), "device", dev.Name, "clusters", len(add.Clusters), "merged", len(out.Clusters))
	writeJSON(w, http.StatusOK, &out)
	return nil
}

// WorkingSet is the layer's working set as devices reported it (empty when none
// did).
func (s *Server) WorkingSet(layer string) (*proto.WorkingSet, error) {
	ws := &proto.WorkingSet{Clusters: []int64{}}
	err := s.st.View(func(tx *catalog.Tx) error {
		_, err := state.GetJSON(tx, state.BucketWorking, layer, ws)
		return err
	})
	return ws, err
}

// MergeWorkingSet adds the clusters of add that have not been seen to have,
// in their order, and keeps at most limit.
func MergeWorkingSet(have, add []int64, limit int) []int64 {
	seen := make(map[int64]bool, len(have)+len(add))
	out := slices.Clone(have)
	for _, c := range have {
		seen[c] = true
	}
	for _, c := range add {
		if !seen[c] && len(out) < limit {
			seen[c] = true
			out = append(out, c)
		}
	}
	return out
}
