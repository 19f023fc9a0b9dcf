package state

import (
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"io"

	"github.com/cvd-project/cvd/catalog"
	"github.com/cvd-project/cvd/disk"
	"github.com/cvd-project/cvd/images"
	"github.com/cvd-project/cvd/syncd/proto"
)

// The cluster-digest index: for every data cluster of every layer the server
// holds, digest → (layer, guest cluster index) of its first holder. A check-in
// sends only the clusters whose digests it does not know. Entries are hints: a
// hit is read back and hashed before it is used, so a stale entry (a layer removed
// since) costs a resend, never wrong data.

func indexValue(layer string, idx int64) ([]byte, error) {
	raw, err := hex.DecodeString(layer)
	if err != nil || len(raw) != sha256.Size {
		return nil, fmt.Errorf("bad layer id %q", layer)
	}
	return binary.BigEndian.AppendUint64(raw, uint64(idx)), nil
}

func parseIndexValue(v []byte) (proto.ClusterRef, bool) {
	if len(v) != sha256.Size+8 {
		return proto.ClusterRef{}, false
	}
	return proto.ClusterRef{Layer: hex.EncodeToString(v[:sha256.Size]), Index: int64(binary.BigEndian.Uint64(v[sha256.Size:]))}, true
}

// Lookup finds a holder of digest d.
func Lookup(tx *catalog.Tx, d proto.Digest) (proto.ClusterRef, bool) {
	return parseIndexValue(tx.Bucket(BucketClusters).Get(d[:]))
}

// IndexEntries records entries of layer (first holder wins).
func IndexEntries(tx *catalog.Tx, layer string, ents []proto.Entry) error {
	recs := make([]catalog.Record, 0, len(ents))
	for _, e := range ents {
		if e.Zero {
			continue
		}
		v, err := indexValue(layer, e.Index)
		if err != nil {
			return err
		}
		recs = append(recs, catalog.Record{K: e.Digest[:], V: v})
	}
	_, err := tx.Bucket(BucketClusters).PutAllIfAbsent(recs)
	return err
}

// LookupAll looks digests up in the index, a few hundred per query: refs[i] is
// where digests[i] can be read, when found[i].
func LookupAll(tx *catalog.Tx, digests []proto.Digest) (refs []proto.ClusterRef, found []bool, err error) {
	keys := make([][]byte, len(digests))
	for i := range digests {
		keys[i] = digests[i][:]
	}
	vals, err := tx.Bucket(BucketClusters).GetAll(keys)
	if err != nil {
		return nil, nil, err
	}
	refs, found = make([]proto.ClusterRef, len(digests)), make([]bool, len(digests))
	for i, v := range vals {
		refs[i], found[i] = parseIndexValue(v)
	}
	return refs, found, nil
}

func IsIndexed(tx *catalog.Tx, layer string) bool {
	return tx.Bucket(BucketIndexed).Get([]byte(layer)) != nil
}

func MarkIndexed(tx *catalog.Tx, layer string, n int64) error {
	return tx.Bucket(BucketIndexed).Put([]byte(layer), binary.BigEndian.AppendUint64(nil, uint64(n)))
}

// indexBatch is how many clusters one transaction of the index takes: small
// enough that other writers (a lease, a clone) wait for it only briefly.
const indexBatch = 4096

// IndexLayerFile reads the data clusters of the layer file at path (its own layer
// only) and records them under id.
func (s *State) IndexLayerFile(ctx context.Context, id, path string) error {
	img, err := disk.Open(path, disk.OpenOptions{ReadOnly: true, NoBacking: true})
	if err != nil {
		return fmt.Errorf("index layer %s: %w", Short(id), err)
	}
	defer img.Close()
	cs := images.DigestClusterSize(img.Info())
	var batch []proto.Entry
	var n int64
	flush := func() error {
		err := s.Update(func(tx *catalog.Tx) error { return IndexEntries(tx, id, batch) })
		batch = batch[:0]
		return err
	}
	err = images.WalkLayerFrom(ctx, img, cs, false, 0, func(idx int64, data []byte) error {
		batch = append(batch, proto.Entry{Index: idx, Digest: sha256.Sum256(data)})
		n++
		if len(batch) == indexBatch {
			return flush()
		}
		return nil
	})
	if err == nil {
		err = flush()
	}
	if err != nil {
		return fmt.Errorf("index layer %s: %w", Short(id), err)
	}
	return s.Update(func(tx *catalog.Tx) error { return MarkIndexed(tx, id, n) })
}

func ReadClusterFrom(img disk.Image, idx int64, cs int, d proto.Digest, buf []byte) ([]byte, error) {
	off := idx * int64(cs)
	if off >= img.Size() {
		return nil, fmt.Errorf("cluster %d beyond the end of %s", idx, img.Info().Path)
	}
	n := min(int64(cs), img.Size()-off)
	b := buf[:n]
	if _, err := img.ReadAt(b, off); err != nil && err != io.EOF {
		return nil, err
	}
	if sha256.Sum256(b) != d {
		return nil, fmt.Errorf("cluster %d of %s: %w (index entry is stale)", idx, img.Info().Path, proto.ErrDigestMismatch)
	}
	return b, nil
}

func Short(id string) string {
	if len(id) > 12 {
		return id[:12]
	}
	return id
}
