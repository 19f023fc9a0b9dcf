package desktop

import (
	"context"
	"encoding/json"
	"fmt"

	"github.com/cvd-project/cvd/catalog"
	"github.com/cvd-project/cvd/files"
	"github.com/cvd-project/cvd/images"
)

// Disk names for VersionFiles.
const (
	DiskSystem = "system"
	DiskUser   = "user"
)

// VersionFiles lists the files of version n (0: the head) of the desktop's
// system or user disk: every ext4 file system on the layer the version's disk
// stands on, read through its chain.
func VersionFiles(ctx context.Context, st *images.Store, name string, n int, diskName string) ([]files.FileSystem, error) {
	d, err := st.Desktop(name)
	if err != nil {
		return nil, err
	}
	if n == 0 {
		n = d.Head
	}
	var v *images.Version
	for i := range d.Versions {
		if d.Versions[i].N == n {
			v = &d.Versions[i]
		}
	}
	if v == nil {
		return nil, fmt.Errorf("desktop %s: version %d: %w", name, n, images.ErrNotFound)
	}
	layer := v.System
	switch diskName {
	case DiskSystem, "":
	case DiskUser:
		layer = v.User
	default:
		return nil, fmt.Errorf("%w: disk %q: want system or user", images.ErrInvalid, diskName)
	}
	if layer == "" {
		return nil, fmt.Errorf("desktop %s: version %d has no %s layer (a blank disk)", name, n, diskName)
	}
	return layerManifest(ctx, st, layer)
}

// bucketManifests caches each layer's manifest (JSON) in the catalog: a
// layer's ID names its content, so the entry never goes stale.
var bucketManifests = []byte("files.manifests")

// layerManifest is the manifest of the file systems on layer id's chain, from
// the catalog's cache or read and then cached (when the store is writable).
func layerManifest(ctx context.Context, st *images.Store, id string) ([]files.FileSystem, error) {
	var cached []byte
	if err := st.Catalog().View(func(tx *catalog.Tx) error {
		cached = tx.Bucket(bucketManifests).Get([]byte(id))
		return nil
	}); err != nil {
		return nil, err
	}
	var out []files.FileSystem
	if cached != nil && json.Unmarshal(cached, &out) == nil {
		return out, nil
	}
	img, err := st.OpenLayer(id, false)
	if err != nil {
		return nil, err
	}
	defer img.Close()
	out, err = files.Manifest(ctx, img)
	if err != nil {
		return nil, err
	}
	if b, err := json.Marshal(out); err == nil {
		// A read-only store (or a full disk) just does not cache.
		_ = st.Catalog().Update(func(tx *catalog.Tx) error { return tx.Bucket(bucketManifests).Put([]byte(id), b) })
	}
	return out, nil
}

// ManifestCached reports whether layer id's manifest is in the catalog.
func ManifestCached(st *images.Store, id string) bool {
	var ok bool
	st.Catalog().View(func(tx *catalog.Tx) error {
		ok = tx.Bucket(bucketManifests).Get([]byte(id)) != nil
		return nil
	})
	return ok
}

// FileSystemDiff is what changed in one file system between two versions.
type FileSystemDiff struct {
	Partition int            `json:"partition"`
	Changes   []files.Change `json:"changes"`
}

// DiffFiles lists the files added, removed and changed from version a to
// version b of the desktop's disk, file system by file system (matched by
// partition).
func DiffFiles(ctx context.Context, st *images.Store, name string, a, b int, diskName string) ([]FileSystemDiff, error) {
	fa, err := VersionFiles(ctx, st, name, a, diskName)
	if err != nil {
		return nil, err
	}
	fb, err := VersionFiles(ctx, st, name, b, diskName)
	if err != nil {
		return nil, err
	}
	byPart := map[int][]files.Entry{}
	for _, f := range fa {
		byPart[f.Partition] = f.Files
	}
	var out []FileSystemDiff
	for _, f := range fb {
		out = append(out, FileSystemDiff{Partition: f.Partition, Changes: files.Diff(byPart[f.Partition], f.Files)})
		delete(byPart, f.Partition)
	}
	for p, fs := range byPart {
		out = append(out, FileSystemDiff{Partition: p, Changes: files.Diff(fs, nil)})
	}
	return out, nil
}
