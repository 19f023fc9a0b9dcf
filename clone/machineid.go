package clone

import (
	"context"
	"errors"
	"fmt"
	"regexp"

	"github.com/cvd-project/cvd/files"
	"github.com/cvd-project/cvd/images"
)

// A desktop that has booted has a machine-id in /etc/machine-id (32 hex digits
// and a newline); clones of it would all share it. Each clone gets its own,
// its UUID's hex digits, written into its own top over the file's one data
// block: the same length, so no file-system metadata changes (ext4 checksums
// cover metadata, not data) and e2fsck stays clean.

var machineIDRe = regexp.MustCompile(`^[0-9a-f]{32}\n$`)

// machineIDOf locates the machine-id of the file system on layer id: nil when
// there is none to replace (no ext4, no file, an empty or uninitialized one,
// one stored otherwise than as one block of data).
func machineIDOf(ctx context.Context, st *images.Store, id string) (*files.Location, error) {
	img, err := st.OpenLayer(id, false)
	if err != nil {
		return nil, err
	}
	defer img.Close()
	loc, err := files.Locate(ctx, img, "/etc/machine-id")
	if errors.Is(err, context.Canceled) {
		return nil, err
	}
	// No file system, no file, one stored otherwise, or one cvd cannot read:
	// the identity is left to the seed and the guest.
	if err != nil || !machineIDRe.Match(loc.Content) {
		return nil, nil
	}
	return loc, nil
}

// writeMachineID writes rec.MachineID over the machine-id's bytes in rec's top.
func writeMachineID(st *images.Store, rec *images.Clone, loc *files.Location, fsync bool) error {
	img, err := st.OpenTop(rec.Disk, false, false)
	if err != nil {
		return err
	}
	b := []byte(rec.MachineID + "\n")
	if int64(len(b)) != loc.Len {
		img.Close()
		return fmt.Errorf("a %d-byte machine-id over a %d-byte file", len(b), loc.Len)
	}
	if _, err := img.WriteAt(b, loc.Off); err != nil {
		img.Close()
		return err
	}
	if fsync {
		if err := img.Flush(); err != nil {
			img.Close()
			return err
		}
	}
	return img.Close()
}
