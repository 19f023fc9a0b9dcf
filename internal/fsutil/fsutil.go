// Package fsutil holds the file-system steps every package that writes files in
// a crash-safe order shares.
package fsutil

import "os"

// Sync flushes the file or directory at path to stable storage (a directory's
// sync makes the names created, renamed or removed in it durable).
func Sync(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	err = f.Sync()
	if err2 := f.Close(); err == nil {
		err = err2
	}
	return err
}
