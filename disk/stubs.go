package disk

// TEMPORARY: signatures being implemented; this file disappears as they land.

import (
	"context"
	"errors"
)

var errTodo = errors.New("disk: not implemented yet")

// Open opens the image at path and its backing chain.
func Open(path string, opts OpenOptions) (Image, error) { return nil, errTodo }

// Create makes a new qcow2 v3 image and returns it opened read-write with its chain.
func Create(path string, opts CreateOptions) (Image, error) { return nil, errTodo }

// Layers lists the chain from the top (index 0) down.
func Layers(img Image) []Image {
	var out []Image
	for l := img; l != nil; l = l.Backing() {
		out = append(out, l)
	}
	return out
}

// MapChain reports which layer serves each part of [off, off+n).
func MapChain(img Image, off, n int64) ([]ChainExtent, error) { return nil, errTodo }

// CheckResult counts what Check found, as qemu-img check counts it.
type CheckResult struct{}

// Check verifies one qcow2 file's refcounts against its references.
func Check(path string, repair bool) (*CheckResult, error) { return nil, errTodo }

// ConvertOptions controls Convert.
type ConvertOptions struct{}

// Convert writes the guest view of src into a new image at dst.
func Convert(ctx context.Context, src Image, dst string, opts ConvertOptions) error { return errTodo }

// Compare reports the first guest offset where a and b differ, or -1.
func Compare(ctx context.Context, a, b Image) (int64, error) { return 0, errTodo }
