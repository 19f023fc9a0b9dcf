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
// and a newline) and its hostname in /etc/hostname; clones of it would all
// share them. Each clone gets its own, written into its own top: the
// machine-id (its UUID's hex digits) over the file's one data block, the same
// length, so no file-system metadata changes; the hostname (the clone's, as
// in its seed) over the file's block, and when its length differs, the
// file's inode with the new size and its metadata_csum checksum (cvd first
// checks that it reproduces the checksum the inode carries). e2fsck stays
// clean.

var machineIDRe = regexp.MustCompile(`^[0-9a-f]{32}\n$`)

// maxHostnameFile bounds the hostname file cvd rewrites.
const maxHostnameFile = 256

// guestIdentity is where a layer's file system keeps its identity: nil
// fields when there is nothing to replace.
type guestIdentity struct {
	machineID *files.Location
	hostname  *files.Location
}

// identityOf locates the machine-id and hostname of the file system on layer
// id: nil when there is no machine-id to replace (no ext4, no file, an empty
// or uninitialized one, one stored otherwise than as one block of data: the
// identity is then left to the seed and the guest); the hostname is located
// when the machine-id is.
func identityOf(ctx context.Context, st *images.Store, id string) (*guestIdentity, error) {
	img, err := st.OpenLayer(id, false)
	if err != nil {
		return nil, err
	}
	defer img.Close()
	loc, err := files.Locate(ctx, img, "/etc/machine-id")
	if errors.Is(err, context.Canceled) {
		return nil, err
	}
	if err != nil || !machineIDRe.Match(loc.Content) {
		return nil, nil
	}
	gi := &guestIdentity{machineID: loc}
	h, err := files.Locate(ctx, img, "/etc/hostname")
	if errors.Is(err, context.Canceled) {
		return nil, err
	}
	// A hostname file cvd could not rewrite (its inode's checksum not
	// reproduced, stored inline) is left to the seed and the guest.
	if err == nil && h.Len <= maxHostnameFile {
		probe := make([]byte, 1)
		if h.Len == 1 {
			probe = make([]byte, 2)
		}
		if _, err := h.Rewrite(probe); err == nil {
			gi.hostname = h
		}
	}
	return gi, nil
}

// writeIdentity writes rec's machine-id, and its hostname where the layer
// has a hostname file, into rec's top.
func writeIdentity(st *images.Store, rec *images.Clone, gi *guestIdentity, fsync bool) (err error) {
	b := []byte(rec.MachineID + "\n")
	if int64(len(b)) != gi.machineID.Len {
		return fmt.Errorf("a %d-byte machine-id over a %d-byte file", len(b), gi.machineID.Len)
	}
	ws := []files.Write{{Off: gi.machineID.Off, Data: b}}
	if gi.hostname != nil && rec.Hostname != "" {
		hw, err := gi.hostname.Rewrite([]byte(rec.Hostname + "\n"))
		if err != nil {
			return fmt.Errorf("hostname: %w", err)
		}
		ws = append(ws, hw...)
	}
	img, err := st.OpenTop(rec.Disk, false, false)
	if err != nil {
		return err
	}
	defer func() {
		if cerr := img.Close(); err == nil {
			err = cerr
		}
	}()
	for _, w := range ws {
		if _, err := img.WriteAt(w.Data, w.Off); err != nil {
			return err
		}
	}
	if fsync {
		return img.Flush()
	}
	return nil
}
