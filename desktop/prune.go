package desktop

import (
	"fmt"
	"sort"

	"github.com/cvd-project/cvd/images"
)

// Prune removes the desktop's old version records: it keeps the head,
// the keep newest versions, and the versions in pinned (a version a device's
// lease stands on, say); a pending switch keeps its own layer. The layers only
// the removed versions used are then kept by nothing, and gc frees them. It
// returns the versions removed (none with dryRun, which only says which).
func Prune(st *images.Store, name string, keep int, dryRun bool, pinned ...int) ([]images.Version, error) {
	if keep < 0 {
		return nil, fmt.Errorf("%w: keep %d versions", images.ErrInvalid, keep)
	}
	var gone []images.Version
	plan := func(d *images.Desktop) []images.Version {
		ns := make([]int, 0, len(d.Versions))
		for _, v := range d.Versions {
			ns = append(ns, v.N)
		}
		sort.Sort(sort.Reverse(sort.IntSlice(ns)))
		stay := map[int]bool{d.Head: true}
		for i := 0; i < keep && i < len(ns); i++ {
			stay[ns[i]] = true
		}
		for _, n := range pinned {
			stay[n] = true
		}
		var kept, out []images.Version
		for _, v := range d.Versions {
			if stay[v.N] {
				kept = append(kept, v)
			} else {
				out = append(out, v)
			}
		}
		d.Versions = kept
		return out
	}
	if dryRun {
		d, err := st.Desktop(name)
		if err != nil {
			return nil, err
		}
		return plan(d), nil
	}
	_, err := st.UpdateDesktop(nil, name, func(d *images.Desktop) error {
		gone = plan(d)
		return nil
	})
	if err != nil {
		return nil, err
	}
	return gone, nil
}
