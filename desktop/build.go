package desktop

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"io"
	"os"
	"path"

	"github.com/cvd-project/cvd/disk"
	"github.com/cvd-project/cvd/images"
	"github.com/cvd-project/cvd/internal/fsutil"
	"github.com/cvd-project/cvd/internal/proc"
	"github.com/cvd-project/cvd/overlay"
)

// Building new chains beside the old ones. New layers are sealed into the store
// from temporary overlays in the desktops directory (".tmp-*": the store's
// recovery removes them after a crash); a new layer that ends up unused after a
// crash is an unreferenced layer that gc removes. A desktop's new top is
// journaled with Store.Begin and becomes the desktop's only in the transaction
// that switches it.

// randSuffix is a short random hex string for new file names.
func randSuffix() string {
	var b [4]byte
	rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// layerBacking is how a file in the desktops directory names a store layer.
func layerBacking(id string) string { return "../" + images.LayersDir + "/" + id + ".qcow2" }

// sealCopy makes a new sealed layer of kind on parent holding what the layers
// own allocate, read through view (several layers merged into one, or one
// layer restacked). It returns the new layer's ID.
func sealCopy(ctx context.Context, st *images.Store, view disk.Image, own []disk.Image, parent string, size int64, cs int, kind images.Kind) (string, error) {
	tmp := st.Path(images.DesktopsDir + "/" + proc.TempPrefix() + "merge-" + randSuffix() + ".qcow2")
	defer os.Remove(tmp)
	img, err := overlay.CreateTemp(tmp, disk.CreateOptions{Size: size, ClusterSize: cs, BackingFile: st.LayerPath(parent),
		BackingFormat: disk.FormatQcow2, AllowedRoots: []string{st.Dir()}})
	if err != nil {
		return "", fmt.Errorf("merge layer: %w", err)
	}
	_, err = overlay.CopyExtents(ctx, view, own, img)
	if cerr := img.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return "", fmt.Errorf("merge layer: %w", err)
	}
	l, _, err := st.Seal(ctx, tmp, images.ImportOptions{Kind: kind})
	if err != nil {
		return "", err
	}
	return l.ID, nil
}

// copyTop copies the file of a top byte for byte to dst (which must not exist),
// then names backing as its backing file, and syncs it.
func copyTop(src, dst, backingID string) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o644)
	if err != nil {
		return err
	}
	_, err = io.Copy(out, in) // copy_file_range where the kernel has it
	if err == nil {
		err = out.Sync()
	}
	if cerr := out.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = disk.SetBacking(dst, layerBacking(backingID), disk.FormatQcow2)
	}
	return err
}

// newTopRel is a fresh store-relative name for a desktop's system top.
func newTopRel(name string) string {
	return path.Join(images.DesktopsDir, name+".system."+randSuffix()+".qcow2")
}

// built is a desktop's new chain, ready to switch to.
type built struct {
	system string // the layer the new top stands on
	topRel string // the new top, journaled by p
	p      *images.Pending
	cost   Cost
}

// build makes the new chain of a desktop beside its old one: for a move, its own
// version layers merged into one new layer on the new lower layers (when it has
// any) and a copy of its top on that; for a refresh, an empty top on the new
// lower layers.
func build(ctx context.Context, st *images.Store, d *images.Desktop, newLower string, refresh bool) (b *built, err error) {
	dc, err := openDesktopChain(st, d)
	if err != nil {
		return nil, err
	}
	defer dc.Close()
	b = &built{system: newLower, topRel: newTopRel(d.Name)}
	if !refresh && len(dc.versions) > 0 {
		// The versions as the top version layer shows them.
		view := dc.own[1]
		id, err := sealCopy(ctx, st, view, dc.own[1:], newLower, dc.top.Size(), dc.own[1].Info().ClusterSize, images.KindVersion)
		if err != nil {
			return nil, fmt.Errorf("desktop %s: %w", d.Name, err)
		}
		b.system = id
	}
	p, err := st.Begin("recompose "+d.Name, []string{b.topRel})
	if err != nil {
		return nil, err
	}
	defer func() {
		if err != nil {
			p.Abort()
		}
	}()
	dst := st.Path(b.topRel)
	if refresh {
		info := dc.top.Info()
		err = disk.CreateFile(dst, disk.CreateOptions{Size: dc.top.Size(), ClusterSize: info.ClusterSize,
			BackingFile: st.LayerPath(b.system), BackingFormat: disk.FormatQcow2, AllowedRoots: []string{st.Dir()}})
	} else {
		err = copyTop(st.Path(d.SystemDisk), dst, b.system)
	}
	if err != nil {
		return nil, fmt.Errorf("desktop %s: new top: %w", d.Name, err)
	}
	if err := fsutil.Sync(st.Path(images.DesktopsDir)); err != nil {
		return nil, err
	}
	b.p = p
	return b, nil
}
