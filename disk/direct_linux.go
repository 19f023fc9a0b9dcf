package disk

import (
	"os"
	"syscall"
)

// openDirect opens path for writing with O_DIRECT, or returns nil where the file
// system refuses it (tmpfs, some FUSE file systems).
func openDirect(path string) *os.File {
	f, err := os.OpenFile(path, os.O_WRONLY|syscall.O_DIRECT, 0)
	if err != nil {
		return nil
	}
	return f
}
