package images

import (
	"context"
	"errors"
	"sort"
	"strings"

	"github.com/cvd-project/cvd/catalog"
)

// GCReport says what a garbage collection removed (or, dry, would remove).
type GCReport struct {
	DryRun  bool    `json:"dry_run"`
	Removed []Layer `json:"removed"`
	Bytes   int64   `json:"bytes"` // file bytes of the removed layers
	Kept    int     `json:"kept"`  // layers kept
}

// Keeper names layers that a package above keeps in use (a check-in receiving
// on a parent layer); GC keeps them and their ancestors.
type Keeper func(tx *catalog.Tx) ([]string, error)

var keepers []Keeper

// RegisterKeeper adds a keeper (call it from init).
func RegisterKeeper(k Keeper) { keepers = append(keepers, k) }

// Derived lists layers made from other layers (made[i] from from[i]: a layer
// recomposed onto a base variant): GC keeps made[i] while it keeps from[i].
type Derived func(tx *catalog.Tx) (from, made []string, err error)

var derived []Derived

// RegisterDerived adds a list of derived layers (call it from init).
func RegisterDerived(d Derived) { derived = append(derived, d) }

// LayerLockKey is the key of the catalog's lock (see catalog.DB.TryLock) that a
// process holds, shared, while it reads a layer that nothing else may keep (a
// layer streamed to a device); GC takes it exclusively before it removes one.
func LayerLockKey(id string) string { return "layer/" + id }

// ErrGCRunning: another process of the site collects garbage now.
var ErrGCRunning = errors.New("another garbage collection is running")

// GC removes every layer that nothing keeps. A layer is kept when it has a name,
// when a desktop version or a clone stands on it, when a keeper names it (an
// open check-in's parent), when a process of the site reads it (its layer
// lock), or when a kept layer stands on it (its ancestors). One runs at a time
// across the site. With dryRun nothing changes.
func (s *Store) GC(ctx context.Context, dryRun bool) (*GCReport, error) {
	rep := &GCReport{DryRun: dryRun}
	if !dryRun {
		release, err := s.db.TryLock("gc", false)
		if errors.Is(err, catalog.ErrLocked) {
			return nil, ErrGCRunning
		} else if err != nil {
			return nil, err
		}
		defer release()
	}
	var locked []func()
	defer func() {
		for _, release := range locked {
			release()
		}
	}()
	mark := func(tx *catalog.Tx) ([]string, error) {
		rep.Removed, rep.Bytes, rep.Kept = nil, 0, 0
		layers := map[string]*Layer{}
		err := tx.Bucket(bucketLayers).ForEach(func(k, v []byte) error {
			var l Layer
			if _, err := getJSON(tx.Bucket(bucketLayers), string(k), &l); err != nil {
				return err
			}
			layers[l.ID] = &l
			return nil
		})
		if err != nil {
			return nil, err
		}
		kept := map[string]bool{}
		var keep func(id string)
		keep = func(id string) {
			for id != "" && !kept[id] {
				kept[id] = true
				l := layers[id]
				if l == nil {
					return
				}
				id = l.Parent
			}
		}
		tx.Bucket(bucketNames).ForEach(func(k, v []byte) error { keep(string(v)); return nil })
		tx.Bucket(bucketRefs).ForEach(func(k, v []byte) error {
			parts := strings.SplitN(string(k), "\x00", 3)
			if len(parts) == 3 && parts[1] != "layer" {
				keep(parts[0])
			}
			return nil
		})
		for _, k := range keepers {
			ids, err := k(tx)
			if err != nil {
				return nil, err
			}
			for _, id := range ids {
				keep(id)
			}
		}
		for _, d := range derived {
			from, made, err := d(tx)
			if err != nil {
				return nil, err
			}
			for i := range from {
				if kept[from[i]] {
					keep(made[i])
				}
			}
		}
		if !dryRun {
			// A layer being read keeps itself and its ancestors; the others
			// stay locked until their files are gone.
			for id := range layers {
				if kept[id] {
					continue
				}
				release, err := s.db.TryLock(LayerLockKey(id), false)
				if errors.Is(err, catalog.ErrLocked) {
					keep(id)
					continue
				} else if err != nil {
					return nil, err
				}
				locked = append(locked, release)
			}
		}
		var dead []*Layer
		for id, l := range layers {
			if kept[id] {
				rep.Kept++
			} else {
				dead = append(dead, l)
			}
		}
		sort.Slice(dead, func(i, j int) bool { return dead[i].ID < dead[j].ID })
		var files []string
		for _, l := range dead {
			rep.Removed = append(rep.Removed, *l)
			rep.Bytes += l.FileSize
			files = append(files, l.File)
		}
		if dryRun {
			return files, nil
		}
		for _, l := range dead {
			if err := deleteLayerTx(tx, l); err != nil {
				return nil, err
			}
		}
		return files, nil
	}
	if dryRun {
		err := s.db.View(func(tx *catalog.Tx) error { _, err := mark(tx); return err })
		return rep, err
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	if err := s.removeJournaled("gc", mark); err != nil {
		return nil, err
	}
	return rep, nil
}
