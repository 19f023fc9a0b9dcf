package images

import "github.com/cvd-project/cvd/disk"

// OpenLayer opens sealed layer id read-only: with its whole chain, or alone
// (what the layer itself allocates, its backing not opened).
func (s *Store) OpenLayer(id string, alone bool) (disk.Image, error) {
	return disk.Open(s.LayerPath(id), disk.OpenOptions{ReadOnly: true, NoBacking: alone, AllowedRoots: []string{s.dir}})
}

// OpenTop opens a writable top of the store (a store-relative path as the
// records name it: a desktop's or a clone's disk) with its chain, confined to
// the store; alone opens the top without its backing.
func (s *Store) OpenTop(rel string, readOnly, alone bool) (disk.Image, error) {
	return disk.Open(s.Path(rel), disk.OpenOptions{ReadOnly: readOnly, NoBacking: alone, AllowedRoots: []string{s.dir}})
}
