package desktop

import (
	"context"
	"fmt"
	"time"

	"github.com/cvd-project/cvd/disk"
	"github.com/cvd-project/cvd/images"
	"github.com/cvd-project/cvd/internal/fsutil"
)

// SquashOptions controls Squash.
type SquashOptions struct {
	// Keep is how many of the newest version layers stay as they are (copied onto
	// the merged layer); the older ones are merged into one layer.
	Keep   int
	DryRun bool
	// InUse as in RecomposeSpec: a desktop in use is not squashed.
	InUse func(d *images.Desktop) (bool, error)
}

// SquashReport says what Squash did, or would do.
type SquashReport struct {
	Desktop  string `json:"desktop"`
	FromHead int    `json:"from-head"`
	Keep     int    `json:"keep"`
	// Chain is the head's version layers before, top first.
	Chain []string `json:"chain"`
	// Merged are the version layers merged into Merge; Kept those re-made on it
	// (as Remade, in the same order).
	Merged []string `json:"merged"`
	Kept   []string `json:"kept"`
	Merge  string   `json:"merge,omitempty"`
	Remade []string `json:"remade,omitempty"`
	// Versions dropped from the history (their layers were merged) and those
	// given a new layer.
	Dropped  []int          `json:"dropped-versions"`
	Remapped map[int]string `json:"remapped-versions,omitempty"`
	Cost     Cost           `json:"cost"`
	Applied  bool           `json:"applied"`
	Seconds  float64        `json:"seconds"`
	Note     string         `json:"note,omitempty"`
}

// Squash shortens the system chain of a desktop: of its own version layers (those
// between its base and app layers and its top), the opts.Keep newest stay and
// the older ones are merged into one new layer. Sealed layers are never written:
// the merge is a new layer, the kept versions are re-made as new layers on it
// (same content, new parents), and the top is copied onto the last of them. The
// history is rewritten in one store transaction: versions that stood on a merged
// layer are dropped, except the newest of them, which stands on the merge; kept
// versions stand on their new layers. The guest view of every remaining version
// and of the desktop is unchanged. A crash leaves the desktop wholly as it was
// or wholly squashed (new layers left unused are removed by gc).
func Squash(ctx context.Context, st *images.Store, name string, opts SquashOptions) (*SquashReport, error) {
	start := time.Now()
	if opts.Keep < 0 {
		return nil, fmt.Errorf("%w: --keep %d", images.ErrInvalid, opts.Keep)
	}
	d, err := st.Desktop(name)
	if err != nil {
		return nil, err
	}
	inUse := opts.InUse
	if inUse == nil {
		inUse = defaultInUse
	}
	if use, err := inUse(d); err != nil {
		return nil, err
	} else if use && !opts.DryRun {
		return nil, fmt.Errorf("desktop %s is in use: squash it when it is stopped", name)
	}
	dc, err := openDesktopChain(st, d)
	if err != nil {
		return nil, err
	}
	defer dc.Close()
	rep := &SquashReport{Desktop: name, FromHead: d.Head, Keep: opts.Keep, Chain: dc.versions,
		Merged: []string{}, Kept: []string{}, Dropped: []int{}}
	if len(dc.versions) <= opts.Keep+1 {
		rep.Kept = dc.versions
		rep.Note = fmt.Sprintf("nothing to merge: %d version layers, keeping %d", len(dc.versions), opts.Keep)
		rep.Seconds = time.Since(start).Seconds()
		return rep, nil
	}
	k := opts.Keep
	rep.Kept, rep.Merged = dc.versions[:k], dc.versions[k:]
	// The top's file is copied; every own version layer is read and written twice
	// (as an overlay, then as its sealed copy): the same as moving the delta.
	rep.Cost = dc.moveCost()
	if opts.DryRun {
		rep.Dropped, rep.Remapped = squashHistory(d, rep.Merged, rep.Kept, nil, "")
		rep.Seconds = time.Since(start).Seconds()
		return rep, nil
	}

	b, merge, remade, err := buildSquash(ctx, st, d, dc, k)
	if err != nil {
		return nil, err
	}
	rep.Merge, rep.Remade = merge, remade
	_, err = switchDesktop(st, b, d, func(x *images.Desktop) error {
		rep.Dropped, rep.Remapped = squashHistory(x, rep.Merged, rep.Kept, remade, merge)
		return nil
	})
	if err != nil {
		return rep, err
	}
	rep.Applied = true
	rep.Seconds = time.Since(start).Seconds()
	return rep, nil
}

// squashHistory rewrites the versions of x (when remade is not nil) and lists
// what changes: versions on a merged layer are dropped except the newest, which
// moves to merge; versions on a kept layer move to its remade copy.
func squashHistory(x *images.Desktop, merged, kept, remade []string, merge string) (dropped []int, remapped map[int]string) {
	dropped = []int{}
	remapped = map[int]string{}
	newest := merged[0] // merged is top first
	keptIdx := map[string]int{}
	for i, id := range kept {
		keptIdx[id] = i
	}
	isMerged := map[string]bool{}
	for _, id := range merged {
		isMerged[id] = true
	}
	var out []images.Version
	for _, v := range x.Versions {
		switch i, ok := keptIdx[v.System]; {
		case ok:
			remapped[v.N] = "(new copy of " + images.ShortID(v.System) + ")"
			if remade != nil {
				remapped[v.N] = remade[i]
				v.System = remade[i]
			}
		case v.System == newest:
			remapped[v.N] = "(merge)"
			if remade != nil {
				remapped[v.N] = merge
				v.System = merge
			}
		case isMerged[v.System] && v.N != x.Head:
			dropped = append(dropped, v.N)
			continue
		}
		out = append(out, v)
	}
	if remade != nil {
		x.Versions = out
	}
	return dropped, remapped
}

// buildSquash makes the squashed chain of d beside its old one: the merge of its
// own version layers older than the k newest, those k re-made on it, and a copy
// of its top on the last (journaled by the returned built's Pending).
func buildSquash(ctx context.Context, st *images.Store, d *images.Desktop, dc *desktopChain, k int) (b *built, merge string, remade []string, err error) {
	name := d.Name
	// The merge: what the old versions hold, as the newest of them shows it.
	size, cs := dc.top.Size(), dc.own[1+k].Info().ClusterSize
	merge, err = sealCopy(ctx, st, dc.own[1+k], dc.own[1+k:], dc.oldLower, size, cs, images.KindVersion)
	if err != nil {
		return nil, "", nil, fmt.Errorf("squash %s: %w", name, err)
	}
	parent := merge
	remade = make([]string, k)
	for i := k - 1; i >= 0; i-- {
		l := dc.own[1+i]
		id, err := sealCopy(ctx, st, l, []disk.Image{l}, parent, size, l.Info().ClusterSize, images.KindVersion)
		if err != nil {
			return nil, "", nil, fmt.Errorf("squash %s: %w", name, err)
		}
		remade[i], parent = id, id
	}
	b = &built{system: parent, topRel: newTopRel(name)}
	if b.p, err = st.Begin("squash "+name, []string{b.topRel}); err != nil {
		return nil, "", nil, err
	}
	if err := copyTop(st.Path(d.SystemDisk), st.Path(b.topRel), parent); err != nil {
		b.p.Abort()
		return nil, "", nil, fmt.Errorf("squash %s: new top: %w", name, err)
	}
	if err := fsutil.Sync(st.Path(images.DesktopsDir)); err != nil {
		b.p.Abort()
		return nil, "", nil, err
	}
	return b, merge, remade, nil
}
