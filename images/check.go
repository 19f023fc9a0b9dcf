package images

import (
	"context"
	"encoding/json"
	"fmt"
	"maps"
	"os"
	"slices"
	"sort"
	"strings"

	"github.com/cvd-project/cvd/catalog"
	"github.com/cvd-project/cvd/disk"
	"github.com/cvd-project/cvd/internal/proc"
)

// Problem is one inconsistency Check found.
type Problem struct {
	Kind string `json:"kind"` // see the Problem* constants
	Path string `json:"path,omitempty"`
	Msg  string `json:"msg"`
}

func (p Problem) String() string {
	if p.Path != "" {
		return fmt.Sprintf("%s: %s: %s", p.Kind, p.Path, p.Msg)
	}
	return fmt.Sprintf("%s: %s", p.Kind, p.Msg)
}

// Kinds of problems.
const (
	ProblemMissingFile = "missing-file" // a record names a file that is not there
	ProblemStrayFile   = "stray-file"   // a file in the store that no record names
	ProblemTempFile    = "temp-file"    // a temporary file of an interrupted operation
	ProblemPending     = "pending"      // an interrupted operation not yet recovered
	ProblemWritable    = "writable"     // a sealed layer file that is not read-only
	ProblemAltered     = "altered"      // a sealed layer file changed since it was sealed
	ProblemBadRef      = "bad-ref"      // a record that names a layer, desktop or clone that is missing
	ProblemImage       = "image"        // a file that does not open or check as an image (Deep)
)

// CheckOptions controls Check.
type CheckOptions struct {
	// Deep also recomputes every layer's ID and checks every image's refcounts
	// (slow: reads all data).
	Deep bool
}

// CheckReport is what Check found.
type CheckReport struct {
	Recovered []string  `json:"recovered,omitempty"` // what Open did to recover
	Layers    int       `json:"layers"`
	Desktops  int       `json:"desktops"`
	Clones    int       `json:"clones"`
	Problems  []Problem `json:"problems"`
}

// OK reports a clean store.
func (r *CheckReport) OK() bool { return len(r.Problems) == 0 }

// Check compares the database with the files: every record's files exist, every
// file belongs to a record, sealed layers are read-only and unchanged since they
// were sealed (size and modification time; Deep recomputes IDs), references point
// at existing objects.
func (s *Store) Check(ctx context.Context, opts CheckOptions) (*CheckReport, error) {
	rep, err := s.check(ctx, opts)
	if err != nil || rep.OK() {
		return rep, err
	}
	// Other processes work on the store meanwhile: a file problem that a fresh
	// look at the catalog no longer shows (a clone committed, a desktop removed
	// after the first look) is not one.
	again, err := s.check(ctx, CheckOptions{})
	if err != nil {
		return nil, err
	}
	still := map[Problem]bool{}
	for _, p := range again.Problems {
		still[p] = true
	}
	kept := rep.Problems[:0]
	for _, p := range rep.Problems {
		switch p.Kind {
		case ProblemStrayFile, ProblemMissingFile, ProblemPending, ProblemTempFile:
			if !still[p] {
				continue
			}
		}
		kept = append(kept, p)
	}
	rep.Problems = kept
	return rep, nil
}

func (s *Store) check(ctx context.Context, opts CheckOptions) (*CheckReport, error) {
	rep := &CheckReport{Recovered: s.recovered, Problems: []Problem{}}
	inProgress := map[string]bool{}
	add := func(kind, path, f string, a ...any) {
		rep.Problems = append(rep.Problems, Problem{Kind: kind, Path: path, Msg: fmt.Sprintf(f, a...)})
	}
	known := map[string]bool{}
	var layers []Layer
	var tops []string
	err := s.db.View(func(tx *catalog.Tx) error {
		lb := tx.Bucket(bucketLayers)
		err := lb.ForEach(func(k, v []byte) error {
			var l Layer
			if err := json.Unmarshal(v, &l); err != nil {
				add(ProblemBadRef, "", "layer record %s: %v", k, err)
				return nil
			}
			layers = append(layers, l)
			known[l.File] = true
			if l.ID != string(k) || l.File != layerRel(l.ID) {
				add(ProblemBadRef, l.File, "layer record %s names file %s", shortID(string(k)), l.File)
			}
			if l.Parent != "" {
				if lb.Get([]byte(l.Parent)) == nil {
					add(ProblemBadRef, l.File, "parent layer %s is missing", shortID(l.Parent))
				}
				if tx.Bucket(bucketRefs).Get(refKey(l.Parent, "layer", l.ID)) == nil {
					add(ProblemBadRef, l.File, "parent %s does not list it as a dependent", shortID(l.Parent))
				}
			}
			return nil
		})
		if err != nil {
			return err
		}
		rep.Layers = len(layers)
		tx.Bucket(bucketNames).ForEach(func(k, v []byte) error {
			if lb.Get(v) == nil {
				add(ProblemBadRef, "", "name %s points at missing layer %s", k, shortID(string(v)))
			}
			return nil
		})
		versions, err := loadAllVersions(tx)
		if err != nil {
			return err
		}
		err = tx.Bucket(bucketDesktops).ForEach(func(k, v []byte) error {
			var d Desktop
			if err := json.Unmarshal(v, &d); err != nil {
				add(ProblemBadRef, "", "desktop record %s: %v", k, err)
				return nil
			}
			if len(d.Versions) == 0 {
				d.Versions = versions[d.Name]
			}
			delete(versions, d.Name)
			rep.Desktops++
			for _, f := range []string{d.SystemDisk, d.UserDisk} {
				if f != "" {
					known[f] = true
					tops = append(tops, f)
				}
			}
			if d.HeadVersion() == nil {
				add(ProblemBadRef, "", "desktop %s: head version %d is missing", d.Name, d.Head)
			}
			for _, id := range d.layerRefs() {
				if lb.Get([]byte(id)) == nil {
					add(ProblemBadRef, "", "desktop %s: layer %s is missing", d.Name, shortID(id))
				} else if tx.Bucket(bucketRefs).Get(refKey(id, "desktop", d.Name)) == nil {
					add(ProblemBadRef, "", "desktop %s: layer %s does not list it as a dependent", d.Name, shortID(id))
				}
			}
			return nil
		})
		if err != nil {
			return err
		}
		for _, name := range slices.Sorted(maps.Keys(versions)) {
			add(ProblemBadRef, "", "versions of %s: no such desktop", name)
		}
		macs := tx.Bucket(bucketMACs)
		err = tx.Bucket(bucketClones).ForEach(func(k, v []byte) error {
			var c Clone
			if err := json.Unmarshal(v, &c); err != nil {
				add(ProblemBadRef, "", "clone record %s: %v", k, err)
				return nil
			}
			rep.Clones++
			files := append([]string{c.Disk, c.UserDisk}, c.Checkpoints...)
			files = append(files, c.UserCheckpoints...)
			for _, f := range append(files, c.Seed) {
				if f != "" {
					known[f] = true
				}
			}
			for _, f := range files {
				if f != "" {
					tops = append(tops, f)
				}
			}
			if c.Seed != "" {
				tops = append(tops, c.Seed)
			}
			for _, id := range []string{c.Layer, c.UserLayer} {
				if id == "" {
					continue
				}
				if lb.Get([]byte(id)) == nil {
					add(ProblemBadRef, c.Disk, "clone %s: layer %s is missing", c.Name, shortID(id))
				} else if tx.Bucket(bucketRefs).Get(refKey(id, "clone", c.Name)) == nil {
					add(ProblemBadRef, c.Disk, "clone %s: layer %s does not list it as a dependent", c.Name, shortID(id))
				}
			}
			if string(macs.Get([]byte(strings.ToLower(c.MAC)))) != c.Name {
				add(ProblemBadRef, "", "clone %s: MAC %s is not indexed to it", c.Name, c.MAC)
			}
			return nil
		})
		if err != nil {
			return err
		}
		tx.Bucket(bucketRefs).ForEach(func(k, v []byte) error {
			parts := strings.SplitN(string(k), "\x00", 3)
			if len(parts) != 3 {
				add(ProblemBadRef, "", "malformed reference %q", k)
				return nil
			}
			var ok bool
			switch parts[1] {
			case "layer":
				ok = lb.Get([]byte(parts[2])) != nil
			case "desktop":
				ok = tx.Bucket(bucketDesktops).Get([]byte(parts[2])) != nil
			case "clone":
				ok = tx.Bucket(bucketClones).Get([]byte(parts[2])) != nil
			}
			if !ok {
				add(ProblemBadRef, "", "layer %s lists missing %s %s as a dependent", shortID(parts[0]), parts[1], parts[2])
			}
			return nil
		})
		tx.Bucket(bucketPending).ForEach(func(k, v []byte) error {
			var e pendingEntry
			json.Unmarshal(v, &e)
			if e.owner().Alive() {
				for _, f := range e.Files {
					inProgress[f] = true // another process is at work on them
				}
				return nil
			}
			add(ProblemPending, "", "interrupted %s (pid %d) not recovered yet: open the store read-write", e.Op, e.PID)
			return nil
		})
		return nil
	})
	if err != nil {
		return nil, err
	}

	// Layer files.
	for _, l := range layers {
		p := s.Path(l.File)
		fi, err := os.Stat(p)
		if err != nil {
			add(ProblemMissingFile, l.File, "layer %s: %v", shortID(l.ID), err)
			continue
		}
		if fi.Mode().Perm()&0o222 != 0 {
			add(ProblemWritable, l.File, "sealed layer is writable (mode %v)", fi.Mode().Perm())
		}
		if fi.Size() != l.FileSize || fi.ModTime().UnixNano() != l.ModTime {
			add(ProblemAltered, l.File, "changed since it was sealed (size %d, was %d; mtime %s); run `cvd layer verify`",
				fi.Size(), l.FileSize, fi.ModTime().Format("2006-01-02 15:04:05.000"))
		}
	}
	for _, f := range tops {
		if _, err := os.Stat(s.Path(f)); err != nil {
			add(ProblemMissingFile, f, "%v", err)
		}
	}

	// Files without records.
	for _, d := range []string{LayersDir, ClonesDir, DesktopsDir} {
		ents, err := os.ReadDir(s.Path(d))
		if err != nil {
			if !os.IsNotExist(err) {
				add(ProblemMissingFile, d, "%v", err)
			}
			continue
		}
		for _, e := range ents {
			rel := d + "/" + e.Name()
			switch {
			case strings.HasPrefix(e.Name(), TempPrefix):
				if !proc.TempAlive(e.Name()) {
					add(ProblemTempFile, rel, "temporary file of an interrupted operation")
				}
			case !known[rel] && !inProgress[rel]:
				add(ProblemStrayFile, rel, "no record names this file")
			}
		}
	}

	if opts.Deep {
		for _, l := range layers {
			if err := ctx.Err(); err != nil {
				return nil, err
			}
			if _, err := os.Stat(s.Path(l.File)); err != nil {
				continue
			}
			if r := s.verifyLayer(ctx, &l); !r.OK {
				for _, m := range r.Problems {
					add(ProblemAltered, l.File, "%s", m)
				}
			}
			s.checkImage(rep, l.File)
		}
		for _, f := range tops {
			if strings.HasSuffix(f, ".qcow2") {
				s.checkImage(rep, f)
			}
		}
	}
	sort.SliceStable(rep.Problems, func(i, j int) bool { return rep.Problems[i].Path < rep.Problems[j].Path })
	return rep, nil
}

func (s *Store) checkImage(rep *CheckReport, rel string) {
	r, err := disk.Check(s.Path(rel), false)
	if err != nil {
		rep.Problems = append(rep.Problems, Problem{Kind: ProblemImage, Path: rel, Msg: err.Error()})
		return
	}
	if r.Corruptions+r.CheckErrors+r.Leaks > 0 {
		rep.Problems = append(rep.Problems, Problem{Kind: ProblemImage, Path: rel,
			Msg: fmt.Sprintf("%d corruptions, %d leaks, %d check errors", r.Corruptions, r.Leaks, r.CheckErrors)})
	}
}
