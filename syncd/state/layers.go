package state

import (
	"context"
	"errors"
	"fmt"
	"log/slog"

	"github.com/cvd-project/cvd/desktop"
	"github.com/cvd-project/cvd/images"
	"github.com/cvd-project/cvd/syncd/proto"
)

// LayerOf is the layer a version's disk stands on.
func LayerOf(v *proto.Version, diskName string) string {
	if diskName == proto.DiskSystem {
		return v.System
	}
	return v.User
}

// SetLayer sets the layer a version's disk stands on.
func SetLayer(v *proto.Version, diskName, id string) {
	if diskName == proto.DiskSystem {
		v.System = id
	} else {
		v.User = id
	}
}

// AdoptTop makes the top at path the layer opts.WantID without copying it
// (images.Store.Adopt). A top the store cannot take as it is (it does not check
// clean: a VM killed while it wrote leaves leaked clusters) is sealed as a copy
// instead, with the same check of its ID (images.ErrIDMismatch).
func AdoptTop(ctx context.Context, store *images.Store, log *slog.Logger, path string, opts images.AdoptOptions) (*images.Layer, bool, error) {
	l, existed, err := store.Adopt(ctx, path, opts)
	if !errors.Is(err, images.ErrNotAdoptable) {
		return l, existed, err
	}
	log.Warn("not adoptable in place; copying it", "file", path, "err", err)
	l, existed, err = desktop.SealTop(ctx, store, path, nil, false)
	if err == nil && l.ID != opts.WantID {
		if !existed {
			store.RemoveLayer(l.ID)
		}
		return nil, false, fmt.Errorf("%w: it has ID %s, expected %s", images.ErrIDMismatch, Short(l.ID), Short(opts.WantID))
	}
	return l, existed, err
}
