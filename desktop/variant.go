package desktop

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/cvd-project/cvd/catalog"
	"github.com/cvd-project/cvd/disk"
	"github.com/cvd-project/cvd/images"
	"github.com/cvd-project/cvd/overlay"
)

// Base variants. A hardware class may need its own base: the common base with
// a driver layer on it, say. A variant names, for one class, the layer that
// replaces a common base; a device of that class under the apps policy holds
// the variant and the desktop's layers above the common base (apps, versions)
// recomposed onto it. Each recomposed layer is made once, from the layer it
// copies, and remembered (the catalog's class_layers); a new version of the
// desktop costs one new layer per variant, of that version's clusters.
//
// The variants live in the catalog's class_bases table and the recomposed
// layers in class_layers (see catalog/migrations): the functions below are the
// only ones that touch them.

// Variant is the layer that replaces the common base Base for hardware class
// Class.
type Variant struct {
	Class   string    `json:"class"`
	Base    string    `json:"base"`
	Layer   string    `json:"layer"`
	Created time.Time `json:"created"`
}

// ErrNoVariant: no variant of a hardware class stands for a desktop's base.
var ErrNoVariant = errors.New("no base variant")

// RegisterVariant makes layer the variant of base for class (replacing an
// earlier one). base "" is layer's parent; it must be below layer in its chain.
func RegisterVariant(st *images.Store, class, layer, base string) (*Variant, error) {
	if class == "" {
		return nil, fmt.Errorf("a variant needs a hardware class")
	}
	chain, err := st.Chain(layer)
	if err != nil {
		return nil, err
	}
	if len(chain) < 2 {
		return nil, fmt.Errorf("variant %s: it has no parent: a variant is a layer (a driver layer, say) on the common base", images.ShortID(chain[0].ID))
	}
	if base == "" {
		base = chain[1].ID
	} else if b, err := st.Layer(base); err != nil {
		return nil, err
	} else {
		base = b.ID
	}
	if !slices.ContainsFunc(chain[1:], func(l images.Layer) bool { return l.ID == base }) {
		return nil, fmt.Errorf("variant %s does not stand on base %s", images.ShortID(chain[0].ID), images.ShortID(base))
	}
	v := &Variant{Class: class, Base: base, Layer: chain[0].ID, Created: time.Now().UTC().Truncate(time.Second)}
	err = st.Catalog().Update(func(tx *catalog.Tx) error {
		_, err := tx.Exec("INSERT INTO class_bases (class, base, variant, created) VALUES (?, ?, ?, ?)"+
			" ON CONFLICT (class, base) DO UPDATE SET variant = excluded.variant, created = excluded.created",
			v.Class, v.Base, v.Layer, v.Created)
		return err
	})
	if err != nil {
		return nil, err
	}
	return v, nil
}

// Variants lists the registered variants.
func Variants(st *images.Store) ([]Variant, error) {
	var out []Variant
	err := st.Catalog().View(func(tx *catalog.Tx) error {
		return tx.Query("SELECT class, base, variant, created FROM class_bases ORDER BY class, base", nil,
			func(scan func(dest ...any) error) error {
				var v Variant
				if err := scan(&v.Class, &v.Base, &v.Layer, &v.Created); err != nil {
					return err
				}
				v.Created = v.Created.UTC()
				out = append(out, v)
				return nil
			})
	})
	return out, err
}

// VariantFor finds the variant of class for a system disk standing on layer
// system: the one whose base is lowest in system's chain (ErrNoVariant when
// none is).
func VariantFor(st *images.Store, class, system string) (*Variant, error) {
	chain, err := st.Chain(system)
	if err != nil {
		return nil, err
	}
	vs, err := Variants(st)
	if err != nil {
		return nil, err
	}
	for i := len(chain) - 1; i >= 0; i-- {
		for _, v := range vs {
			if v.Class == class && v.Base == chain[i].ID {
				return &v, nil
			}
		}
	}
	return nil, fmt.Errorf("%w for hardware class %q under layer %s", ErrNoVariant, class, images.ShortID(system))
}

// VariantChain is a system disk recomposed onto a variant.
type VariantChain struct {
	Variant Variant `json:"variant"`
	// System is the top layer of the recomposed chain: what the device's
	// system disk stands on.
	System string `json:"system"`
	Made   int    `json:"made"`   // layers this call made
	Reused int    `json:"reused"` // layers made before
	// Conflicts counts the clusters that both the variant's own layers (above
	// the common base) and the desktop's layers above it write: the desktop's
	// win, as they are above.
	Conflicts int64 `json:"conflict_clusters"`
	Bytes     int64 `json:"bytes"` // data bytes the made layers hold
}

// OnVariant recomposes the system chain on layer system onto v: each layer
// above v.Base becomes a layer with the same clusters on the recomposed layer
// below it (v.Layer at the bottom). Layers made earlier are reused.
func OnVariant(ctx context.Context, st *images.Store, system string, v Variant) (*VariantChain, error) {
	chain, err := st.Chain(system)
	if err != nil {
		return nil, err
	}
	at := slices.IndexFunc(chain, func(l images.Layer) bool { return l.ID == v.Base })
	if at < 0 {
		return nil, fmt.Errorf("layer %s does not stand on base %s", images.ShortID(system), images.ShortID(v.Base))
	}
	vc := &VariantChain{Variant: v, System: v.Layer}
	release, err := st.Catalog().Lock(ctx, "variant/"+v.Layer, false)
	if err != nil {
		return nil, err
	}
	defer release()
	vc.Conflicts = -1
	for i := at - 1; i >= 0; i-- {
		l := chain[i]
		made, conflicts, err := rebasedLayer(st, v.Layer, l.ID)
		if err != nil {
			return nil, err
		}
		if made != "" {
			if rl, err := st.Layer(made); err == nil && rl.Parent == vc.System {
				vc.System, vc.Conflicts = made, conflicts
				vc.Reused++
				continue
			}
		}
		id, bytes, err := copyLayerOnto(ctx, st, l, vc.System)
		if err != nil {
			return nil, fmt.Errorf("recompose layer %s onto variant %s: %w", images.ShortID(l.ID), images.ShortID(v.Layer), err)
		}
		// The conflict count is that of the chain up to the top layer: it is
		// counted for a top once (below) and kept on its row.
		if err := putRebased(st, v.Layer, l.ID, id, -1); err != nil {
			return nil, err
		}
		vc.System, vc.Conflicts = id, -1
		vc.Made++
		vc.Bytes += bytes
	}
	if at == 0 {
		vc.Conflicts = 0 // nothing above the base
	}
	if vc.Conflicts < 0 {
		if vc.Conflicts, err = variantConflicts(st, chain[:at], v); err != nil {
			return nil, err
		}
		if err := putRebased(st, v.Layer, chain[0].ID, vc.System, vc.Conflicts); err != nil {
			return nil, err
		}
	}
	return vc, nil
}

// rebasedLayer is the layer made from layer on variant ("" for none) and the
// conflict count of the chain up to it (-1: not counted yet).
func rebasedLayer(st *images.Store, variant, layer string) (id string, conflicts int64, err error) {
	err = st.Catalog().View(func(tx *catalog.Tx) error {
		return tx.Query("SELECT rebased, conflicts FROM class_layers WHERE variant = ? AND layer = ?", []any{variant, layer},
			func(scan func(dest ...any) error) error { return scan(&id, &conflicts) })
	})
	return id, conflicts, err
}

// putRebased remembers that rebased was made from layer on variant.
func putRebased(st *images.Store, variant, layer, rebased string, conflicts int64) error {
	return st.Catalog().Update(func(tx *catalog.Tx) error {
		_, err := tx.Exec("INSERT INTO class_layers (variant, layer, rebased, conflicts) VALUES (?, ?, ?, ?)"+
			" ON CONFLICT (variant, layer) DO UPDATE SET rebased = excluded.rebased, conflicts = excluded.conflicts",
			variant, layer, rebased, conflicts)
		return err
	})
}

// The store's garbage collection keeps a recomposed layer while it keeps the
// layer it copies.
func init() {
	images.RegisterDerived(func(tx *catalog.Tx) (from, made []string, err error) { return RecomposedLayers(tx, "") })
}

// RecomposedLayers lists the layers recomposed onto the variants of class (""
// for every class) and those they copy.
func RecomposedLayers(tx *catalog.Tx, class string) (from, made []string, err error) {
	q, args := "SELECT layer, rebased FROM class_layers", []any(nil)
	if class != "" {
		q, args = "SELECT l.layer, l.rebased FROM class_layers l JOIN class_bases b ON b.variant = l.variant WHERE b.class = ?", []any{class}
	}
	err = tx.Query(q, args, func(scan func(dest ...any) error) error {
		var f, m string
		if err := scan(&f, &m); err != nil {
			return err
		}
		from, made = append(from, f), append(made, m)
		return nil
	})
	return from, made, err
}

// copyLayerOnto seals a new layer on parent holding what layer l itself
// allocates (data as data, zeros as zeros), of l's kind.
func copyLayerOnto(ctx context.Context, st *images.Store, l images.Layer, parent string) (string, int64, error) {
	view, err := st.OpenLayer(l.ID, false)
	if err != nil {
		return "", 0, err
	}
	defer view.Close()
	id, err := sealCopy(ctx, st, view, disk.Layers(view)[:1], parent, view.Size(), view.Info().ClusterSize, l.Kind)
	return id, l.DataBytes, err
}

// variantConflicts counts the clusters both the desktop's layers above the
// common base (above) and the variant's layers above it allocate.
func variantConflicts(st *images.Store, above []images.Layer, v Variant) (int64, error) {
	vchain, err := st.Chain(v.Layer)
	if err != nil {
		return 0, err
	}
	at := slices.IndexFunc(vchain, func(l images.Layer) bool { return l.ID == v.Base })
	if at < 0 {
		return 0, fmt.Errorf("variant %s does not stand on base %s", images.ShortID(v.Layer), images.ShortID(v.Base))
	}
	a, cs, err := allocOf(st, above)
	if err != nil {
		return 0, err
	}
	b, _, err := allocOf(st, vchain[:at])
	if err != nil {
		return 0, err
	}
	var n int64
	for _, r := range intersect(a, b) {
		n += (r.End()+cs-1)/cs - r.Off/cs
	}
	return n, nil
}

// allocOf is what the layers themselves allocate (data or zero), and their
// cluster size.
func allocOf(st *images.Store, ls []images.Layer) (overlay.RangeSet, int64, error) {
	var s overlay.RangeSet
	cs := int64(disk.DefaultClusterSize)
	for _, l := range ls {
		img, err := st.OpenLayer(l.ID, true)
		if err != nil {
			return nil, 0, err
		}
		cs = int64(img.Info().ClusterSize)
		exts, err := img.MapLayer(0, img.Size())
		img.Close()
		if err != nil {
			return nil, 0, err
		}
		for _, e := range exts {
			if e.State != disk.Unallocated {
				s.Add(e.Off, e.Len)
			}
		}
	}
	return s.Normalize(), cs, nil
}
