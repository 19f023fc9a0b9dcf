package laptop

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"time"

	"github.com/cvd-project/cvd/syncd/state"

	"github.com/ulikunitz/xz"

	"github.com/cvd-project/cvd/syncd/proto"
)

// ImportReport says what an import did.
type ImportReport struct {
	Desktop       string    `json:"desktop"`
	Version       int       `json:"version"`
	Expires       time.Time `json:"expires"`
	LayersWritten []string  `json:"layers_written"`
	LayersHeld    []string  `json:"layers_held"`
	Took          float64   `json:"seconds"`
}

// ImportBundle reads a bundle into the laptop's store and sets the desktop up
// over fresh tops, as an offline copy that is purged after the bundle's expiry.
func (l *Laptop) ImportBundle(ctx context.Context, path string) (_ *ImportReport, err error) {
	start := time.Now()
	if _, err := l.PurgeExpired(ctx); err != nil {
		return nil, err
	}
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	// One xz stream, nothing after it (its end is read and checked below).
	xr, err := xz.ReaderConfig{SingleStream: true}.NewReader(bufio.NewReaderSize(f, 1<<20))
	if err != nil {
		return nil, fmt.Errorf("%s: not an xz bundle: %w", path, err)
	}
	br := bufio.NewReaderSize(xr, 1<<20)
	hp, err := proto.ReadBundleHeader(br)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	h := *hp
	if h.Expires.Before(l.now()) {
		return nil, fmt.Errorf("bundle of %s: %w at %s", h.Desktop, proto.ErrExpired, h.Expires.Format(time.RFC3339))
	}
	if prev, err := l.Checkout(h.Desktop); err == nil && !prev.Offline {
		return nil, fmt.Errorf("desktop %s is checked out from %s here; check it in or release it first", h.Desktop, prev.Server)
	}
	rep := &ImportReport{Desktop: h.Desktop, Version: h.Version, Expires: h.Expires, LayersWritten: []string{}, LayersHeld: []string{}}
	// A failed import leaves no layer it wrote (newest first: children before
	// their parents).
	defer func() {
		if err == nil {
			return
		}
		for i := len(rep.LayersWritten) - 1; i >= 0; i-- {
			if _, rerr := l.store.RemoveLayer(rep.LayersWritten[i]); rerr != nil {
				l.log.Warn("remove a layer of a failed import", "layer", rep.LayersWritten[i], "err", rerr)
			}
		}
	}()
	var need int64
	for _, li := range h.Layers {
		need += li.DataBytes
	}
	if err := state.CheckFree(l.store.Dir(), need+32<<20); err != nil {
		return nil, err
	}
	if err := os.MkdirAll(l.fetchDir(), 0o700); err != nil {
		return nil, proto.NoSpace(err)
	}
	for _, li := range h.Layers {
		sr := proto.NewStreamReader(br)
		if _, err := l.store.Layer(li.ID); err == nil {
			// Held already: read past its stream.
			if err := proto.SkipStream(sr); err != nil {
				return nil, err
			}
			rep.LayersHeld = append(rep.LayersHeld, li.ID)
			continue
		}
		fl := &layerFetcher{l: l, info: li, path: filepath.Join(l.fetchDir(), li.ID+".qcow2"),
			ckptPath: filepath.Join(l.fetchDir(), li.ID+".ckpt")}
		os.Remove(fl.ckptPath) // a bundle is read from its start: no resume
		if err := fl.open(); err != nil {
			return nil, err
		}
		l.opts.Progress.Start("layer "+state.Short(li.ID), li.DataBytes)
		_, done, err := fl.consume(ctx, sr)
		l.opts.Progress.Done()
		if err == nil && !done {
			err = fmt.Errorf("%w: layer %s incomplete", proto.ErrStream, state.Short(li.ID))
		}
		if err == nil {
			err = fl.finish(ctx)
		}
		fl.close()
		if err != nil {
			os.Remove(fl.path)
			os.Remove(fl.ckptPath)
			return nil, fmt.Errorf("bundle layer %s: %w", state.Short(li.ID), err)
		}
		rep.LayersWritten = append(rep.LayersWritten, li.ID)
	}
	// The payload ends with the last layer: reading on checks the xz stream's
	// checksum and that nothing follows it.
	if extra, err := io.Copy(io.Discard, io.LimitReader(br, 1)); err != nil || extra > 0 {
		if err == nil {
			err = errors.New("data after the last layer")
		}
		return nil, fmt.Errorf("%s: %w: %v", path, proto.ErrBadRequest, err)
	}
	co := &Checkout{Desktop: h.Desktop, Server: h.Server, Version: h.Version, Layers: map[string]string{},
		BlankSizes: map[string]int64{}, CheckedOut: l.now().UTC(), Offline: true,
		Lease: proto.Lease{ID: "offline", Desktop: h.Desktop, Expires: h.Expires, Granted: h.Created, Version: h.Version}}
	if h.Lease != nil {
		co.Lease = *h.Lease
	}
	for _, dm := range h.Disks {
		if dm.Top() != "" {
			if _, err := l.store.Layer(dm.Top()); err != nil {
				return nil, fmt.Errorf("bundle of %s: layer %s is neither in the bundle nor in the store", h.Desktop, state.Short(dm.Top()))
			}
		}
		co.Layers[dm.Name] = dm.Top()
		if dm.Top() == "" {
			co.BlankSizes[dm.Name] = dm.BlankSize
		}
	}
	if err := l.setupDesktop(ctx, co); err != nil {
		return nil, err
	}
	if err := l.putCheckout(co); err != nil {
		return nil, err
	}
	rep.Took = time.Since(start).Seconds()
	return rep, nil
}
