package disk

import (
	"fmt"
	"os"

	"golang.org/x/sys/unix"
)

// QEMU's image locks (file-posix, locking=auto): while QEMU has an image open it
// holds shared open-file-description locks on byte 100+i for each permission i it
// uses and on byte 200+i for each permission it does not share with others, so
// any QEMU (a VM, qemu-img, qemu-io, qemu-nbd) holding the file has at least one.
const (
	qemuLockBase = 100
	qemuLockLen  = 200
)

// InUse reports whether another open file description holds QEMU's image locks
// on the file at path: a running VM, or any QEMU tool, has it open. It asks the
// kernel (F_OFD_GETLK), so it holds whatever libvirt says, and takes no lock.
func InUse(path string) (bool, error) {
	f, err := os.Open(path)
	if err != nil {
		return false, err
	}
	defer f.Close()
	lk := unix.Flock_t{Type: unix.F_WRLCK, Whence: 0, Start: qemuLockBase, Len: qemuLockLen}
	if err := unix.FcntlFlock(f.Fd(), unix.F_OFD_GETLK, &lk); err != nil {
		return false, fmt.Errorf("query locks of %s: %w", path, err)
	}
	return lk.Type != unix.F_UNLCK, nil
}

// CheckNotInUse returns an error wrapping ErrInUse when InUse says so.
func CheckNotInUse(path string) error {
	busy, err := InUse(path)
	if err != nil {
		return err
	}
	if busy {
		return fmt.Errorf("%s: %w", path, ErrInUse)
	}
	return nil
}
