package images

import (
	"errors"
	"fmt"
	"strings"
)

// Sentinel errors. Test with errors.Is.
var (
	// ErrNotFound: no layer, name, desktop or clone matches the reference.
	ErrNotFound = errors.New("not found")
	// ErrAmbiguous: an ID prefix or a bare name matches more than one layer or tag.
	ErrAmbiguous = errors.New("ambiguous reference")
	// ErrExists: a name, tag, desktop or clone of that name already exists.
	ErrExists = errors.New("already exists")
	// ErrHasDependents: a layer or desktop that something still depends on. The
	// error is a *DependentsError that names them.
	ErrHasDependents = errors.New("has dependents")
	// ErrInvalid: a malformed name, tag, kind or option.
	ErrInvalid = errors.New("invalid argument")
	// ErrNoParent: an overlay whose backing file is not a layer of the store, or a
	// layer whose kind does not fit its parent (a base has none, others have one).
	ErrNoParent = errors.New("parent is not a sealed layer of the store")
	// ErrReadOnlyStore: a change asked of a store opened read-only.
	ErrReadOnlyStore = errors.New("store is open read-only")
)

// Dependent is something that stands on a layer: a layer, a desktop or a clone.
type Dependent struct {
	Kind string `json:"kind"` // "layer", "desktop" or "clone"
	Name string `json:"name"` // layer ID, desktop or clone name
}

func (d Dependent) String() string {
	if d.Kind == "layer" {
		return "layer " + shortID(d.Name)
	}
	return d.Kind + " " + d.Name
}

// DependentsError is returned when removing something others depend on. It
// unwraps to ErrHasDependents.
type DependentsError struct {
	What       string      // what was to be removed, e.g. "layer 1a2b3c4d5e6f"
	Dependents []Dependent // everything that depends on it, directly or not
}

func (e *DependentsError) Error() string {
	const max = 10
	var parts []string
	for i, d := range e.Dependents {
		if i == max {
			parts = append(parts, fmt.Sprintf("and %d more", len(e.Dependents)-max))
			break
		}
		parts = append(parts, d.String())
	}
	return fmt.Sprintf("%s has dependents: %s", e.What, strings.Join(parts, ", "))
}

// Unwrap makes errors.Is(err, ErrHasDependents) true.
func (e *DependentsError) Unwrap() error { return ErrHasDependents }
