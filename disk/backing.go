package disk

import (
	"fmt"
	"os"
)

// SetBacking rewrites the backing file name and format recorded in the qcow2
// image at path, without touching its data (an unsafe rebase: the caller makes
// sure the guest view stays right). An empty name removes the backing file.
// The header, its extensions and the name are rewritten in the first cluster
// with one write followed by a sync, as qemu-img rebase -u does.
func SetBacking(path, name string, format Format) error {
	if name != "" && format == "" {
		return fmt.Errorf("set backing of %s: the backing format is required", path)
	}
	if len(name) > maxBackingNameLen {
		return fmt.Errorf("set backing of %s: name longer than %d bytes", path, maxBackingNameLen)
	}
	f, first, h, err := openHeader(path)
	if err != nil {
		return err
	}
	defer f.Close()
	if h.incompat&incompatDirty != 0 {
		return fmt.Errorf("%s: %w: image is dirty", path, ErrUnsupported)
	}
	cs := 1 << h.clusterBits
	h.backingName, h.backingFormat = name, string(format)
	if name == "" {
		h.backingFormat = ""
	}
	buf, err := h.encode(cs)
	if err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	// Clear what the old header area held past the new end, inside cluster 0.
	old := min(len(first), cs)
	if len(buf) < old {
		buf = append(buf, make([]byte, old-len(buf))...)
	}
	if _, err := f.WriteAt(buf, 0); err != nil {
		return fmt.Errorf("write header of %s: %w", path, err)
	}
	return f.Sync()
}

// openHeader opens the qcow2 file at path for writing its metadata in place,
// with its first cluster (up to 2 MiB) and its parsed header.
func openHeader(path string) (*os.File, []byte, *header, error) {
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return nil, nil, nil, err
	}
	fi, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, nil, nil, err
	}
	first := make([]byte, min(fi.Size(), 2<<20))
	if _, err := f.ReadAt(first, 0); err != nil {
		f.Close()
		return nil, nil, nil, fmt.Errorf("read header of %s: %w", path, err)
	}
	h, err := parseHeader(first, fi.Size())
	if err != nil {
		f.Close()
		return nil, nil, nil, fmt.Errorf("%s: %w", path, err)
	}
	return f, first, h, nil
}
