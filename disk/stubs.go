package disk

// TEMPORARY: signatures being implemented; this file disappears as they land.

import (
	"context"
	"errors"
)

var errTodo = errors.New("disk: not implemented yet")



// Layers lists the chain from the top (index 0) down.
func Layers(img Image) []Image {
	var out []Image
	for l := img; l != nil; l = l.Backing() {
		out = append(out, l)
	}
	return out
}


// CheckResult counts what Check found, with the same meaning as the fields of
// `qemu-img check --output=json`.
type CheckResult struct {
	Filename           string   `json:"filename"`
	Format             Format   `json:"format"`
	CheckErrors        int      `json:"check-errors"` // problems that stopped parts of the check
	Corruptions        int      `json:"corruptions"`  // references to free or out-of-file clusters, bad flags, refcount too low
	Leaks              int      `json:"leaks"`        // clusters whose refcount is higher than their references
	CorruptionsFixed   int      `json:"corruptions-fixed"`
	LeaksFixed         int      `json:"leaks-fixed"`
	TotalClusters      int64    `json:"total-clusters"` // guest clusters of the virtual size
	AllocatedClusters  int64    `json:"allocated-clusters"`
	FragmentedClusters int64    `json:"fragmented-clusters"`
	CompressedClusters int64    `json:"compressed-clusters"`
	ImageEndOffset     int64    `json:"image-end-offset"`
	Messages           []string `json:"messages,omitempty"` // one line per problem
}

// Check verifies one qcow2 file's refcounts against its references.
func Check(path string, repair bool) (*CheckResult, error) { return nil, errTodo }

// ConvertOptions controls Convert.
type ConvertOptions struct {
	Format      Format // FormatQcow2 (default) or FormatRaw
	ClusterSize int    // qcow2 only; 0 means the source's, or 64 KiB
	Compress    string // qcow2 only: "", "deflate" or "zstd"
	// Progress, when set, is called with the guest bytes done and the total.
	Progress func(done, total int64)
}

// Convert writes the guest view of src into a new image at dst.
func Convert(ctx context.Context, src Image, dst string, opts ConvertOptions) error { return errTodo }


// Compare reports the first guest offset where a and b differ, or -1 when they
// read the same. When sizes differ, the extra part of the larger must read as
// zeros (qemu-img compare's non-strict rule).
func Compare(ctx context.Context, a, b Image) (int64, error) { return 0, errTodo }
