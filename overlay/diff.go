package overlay

import (
	"context"
	"fmt"

	"github.com/cvd-project/cvd/disk"
)

// DiffReport is the result of DiffStats.
type DiffReport struct {
	// Ranges are the guest ranges whose content differs, whole clusters of
	// Granularity bytes (the last may end at the larger virtual size), sorted and
	// merged.
	Ranges      []Range `json:"ranges"`
	Granularity int64   `json:"granularity"`
	// Clusters and Bytes count what differs.
	Clusters int64 `json:"clusters"`
	Bytes    int64 `json:"bytes"`
	// SharedLayers is how many layers (from the bottom) both chains hold; their
	// clusters were not read.
	SharedLayers int `json:"shared-layers"`
	// Compared counts the clusters examined: those that a layer of only one
	// chain allocates. BytesRead is what was read to compare them.
	Compared  int64 `json:"clusters-compared"`
	BytesRead int64 `json:"bytes-read"`
}

// Diff returns the guest ranges where the chains a and b read differently, at the
// granularity of the larger of the two top layers' cluster sizes. Past the end
// of the smaller disk, it reads as zeros.
//
// The work follows the chains' shared ancestry: layers both chains hold (the same
// file) are never read; only clusters that a layer of one chain alone allocates
// are read, from both chains, and compared byte for byte. The result is exact.
func Diff(ctx context.Context, a, b disk.Image) ([]Range, error) {
	r, err := DiffStats(ctx, a, b)
	if err != nil {
		return nil, err
	}
	return r.Ranges, nil
}

// DiffStats is Diff with the counts of the work done.
func DiffStats(ctx context.Context, a, b disk.Image) (*DiffReport, error) {
	if a == nil || b == nil {
		return nil, fmt.Errorf("diff: nil image")
	}
	g := int64(max(a.Info().ClusterSize, b.Info().ClusterSize, 512))
	p := newPair(a, b)
	rep := &DiffReport{Granularity: g, SharedLayers: len(p.shared), Ranges: []Range{}}
	st, err := p.compare(ctx, g, max(a.Size(), b.Size()), nil, func(res *chunkResult) error {
		for _, d := range res.diffs {
			rep.Ranges = appendMerged(rep.Ranges, d)
			rep.Clusters++
			rep.Bytes += d.Len
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("diff %s %s: %w", a.Info().Path, b.Info().Path, err)
	}
	rep.Compared, rep.BytesRead = st.Candidates, st.Read
	return rep, nil
}
