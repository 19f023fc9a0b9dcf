package laptop

import (
	"bufio"
	"context"
	"encoding/binary"
	"encoding/json"
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
func (l *Laptop) ImportBundle(ctx context.Context, path string) (*ImportReport, error) {
	start := time.Now()
	if _, err := l.PurgeExpired(ctx); err != nil {
		return nil, err
	}
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	xr, err := xz.NewReader(bufio.NewReaderSize(f, 1<<20))
	if err != nil {
		return nil, fmt.Errorf("%s: not an xz bundle: %w", path, err)
	}
	br := bufio.NewReaderSize(xr, 1<<20)
	var magic [len(proto.BundleMagic) + 4]byte
	if _, err := io.ReadFull(br, magic[:]); err != nil || string(magic[:len(proto.BundleMagic)]) != proto.BundleMagic {
		return nil, fmt.Errorf("%s: %w: not a cvd bundle", path, proto.ErrBadRequest)
	}
	n := binary.BigEndian.Uint32(magic[len(proto.BundleMagic):])
	if n > proto.MaxJSON {
		return nil, fmt.Errorf("%s: %w: header of %d bytes", path, proto.ErrBadRequest, n)
	}
	hb := make([]byte, n)
	if _, err := io.ReadFull(br, hb); err != nil {
		return nil, fmt.Errorf("%s: %w: truncated header", path, proto.ErrBadRequest)
	}
	var h proto.BundleHeader
	if err := json.Unmarshal(hb, &h); err != nil {
		return nil, fmt.Errorf("%s: %w: header: %v", path, proto.ErrBadRequest, err)
	}
	if h.Expires.Before(l.now()) {
		return nil, fmt.Errorf("bundle of %s: %w at %s", h.Desktop, proto.ErrExpired, h.Expires.Format(time.RFC3339))
	}
	if prev, err := l.Checkout(h.Desktop); err == nil && !prev.Offline {
		return nil, fmt.Errorf("desktop %s is checked out from %s here; check it in or release it first", h.Desktop, prev.Server)
	}
	rep := &ImportReport{Desktop: h.Desktop, Version: h.Version, Expires: h.Expires, LayersWritten: []string{}, LayersHeld: []string{}}
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
		if !proto.LayerIDRE.MatchString(li.ID) || (li.Parent != "" && !proto.LayerIDRE.MatchString(li.Parent)) {
			return nil, fmt.Errorf("%w: bundle layer id %q", proto.ErrBadRequest, li.ID)
		}
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
