package syncd

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

	"github.com/cvd-project/cvd/catalog"
	"github.com/cvd-project/cvd/syncd/proto"
	"github.com/ulikunitz/xz"
)

// An offline bundle carries a desktop version to a laptop that never reaches the
// server. It is one xz stream (ulikunitz/xz) holding:
//
//	"CVDBNDL1"                 magic
//	4-byte big-endian length, then that many bytes of JSON BundleHeader
//	for each layer of Header.Layers, in order (parents first): its cluster
//	stream, exactly as GET /v1/layers/{id}/clusters sends it but with raw
//	(uncompressed) payloads, since xz compresses the whole
//
// The layers keep their IDs: every cluster is checked against its digest and
// every layer against its ID on import, as on a check-out.

const bundleMagic = "CVDBNDL1"

// BundleHeader describes a bundle.
type BundleHeader struct {
	Desktop string               `json:"desktop"`
	Version int                  `json:"version"`
	Created time.Time            `json:"created"`
	Expires time.Time            `json:"expires"` // the imported copy is purged after this
	Disks   []proto.DiskManifest `json:"disks"`
	Layers  []proto.LayerInfo    `json:"layers"` // parents first
	// Lease is the lease the export took for a device, when it named one.
	Lease *proto.Lease `json:"lease,omitempty"`
	// Server is where the desktop came from (informational).
	Server string `json:"server,omitempty"`
}

// ExportOptions controls Export.
type ExportOptions struct {
	// TTL is how long the imported copy lives (default 7 days).
	TTL time.Duration
	// Device, when set, takes the desktop's lease for that device, as a check-out
	// would: nobody else can check it out until it expires or is released.
	Device string
	// Skip leaves out layers with these IDs (the laptop holds them already).
	Skip []string
}

// ExportReport says what an export wrote.
type ExportReport struct {
	Header BundleHeader `json:"header"`
	Bytes  int64        `json:"bytes"`     // of the bundle file
	Stream int64        `json:"raw_bytes"` // before xz
	Layers int          `json:"layers"`    // layers in the bundle
	Took   float64      `json:"seconds"`
}

// Export writes the head version of desktop into an xz bundle at path (which must
// not exist). Like a check-out, it seals the server's tops first when they hold
// data.
func (s *Server) Export(ctx context.Context, desktop, path string, opts ExportOptions) (*ExportReport, error) {
	start := time.Now()
	if opts.TTL == 0 {
		opts.TTL = 7 * 24 * time.Hour
	}
	unlock := s.lockDesktop(desktop)
	defer unlock()
	if _, err := s.sealServerTops(ctx, desktop, "export seal"); err != nil {
		return nil, err
	}
	h := BundleHeader{Desktop: desktop, Created: s.now().UTC(), Expires: s.now().Add(opts.TTL).UTC()}
	dv, err := desktopVersions(s.store, desktop)
	if err != nil {
		return nil, err
	}
	// The file first: a bundle that cannot be written takes no lease.
	f, err := os.OpenFile(path, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o600)
	if err != nil {
		return nil, fmt.Errorf("export %s: %w", desktop, err)
	}
	var prev *proto.Lease // the lease as it was, restored if the export fails
	err = s.st.update(func(tx *catalog.Tx) error {
		if opts.Device != "" {
			dev, err := deviceByName(tx, opts.Device)
			if err != nil {
				return err
			}
			if !dev.Bound(desktop) {
				return fmt.Errorf("%w: device %s, desktop %s", proto.ErrForbidden, dev.Name, desktop)
			}
			if prev, err = activeLease(tx, desktop); err != nil {
				return err
			}
			l, _, err := grantLease(tx, desktop, dev, opts.TTL, dv.Head, s.now())
			if err != nil {
				return err
			}
			h.Lease = l
			h.Expires = l.Expires
		}
		return nil
	})
	if err != nil {
		f.Close()
		os.Remove(path)
		return nil, err
	}
	fail := func(err error) (*ExportReport, error) {
		f.Close()
		os.Remove(path)
		if h.Lease != nil {
			if uerr := s.undoLease(h.Lease, prev); uerr != nil {
				s.log.Error("export failed and its lease could not be undone", "desktop", desktop, "err", uerr)
			}
		}
		return nil, err
	}
	h.Version = dv.Head
	m := &proto.Manifest{}
	if err := s.fillDisks(m, dv); err != nil {
		return fail(err)
	}
	h.Disks = m.Disks
	skip := map[string]bool{}
	for _, id := range opts.Skip {
		skip[id] = true
	}
	seen := map[string]bool{}
	for _, dm := range h.Disks {
		for i := len(dm.Layers) - 1; i >= 0; i-- {
			li := dm.Layers[i]
			if !seen[li.ID] && !skip[li.ID] {
				h.Layers = append(h.Layers, li)
			}
			seen[li.ID] = true
		}
	}
	rep := &ExportReport{Header: h, Layers: len(h.Layers)}
	err = func() error {
		bw := bufio.NewWriterSize(f, 1<<20)
		xw, err := xz.WriterConfig{DictCap: 8 << 20}.NewWriter(bw)
		if err != nil {
			return err
		}
		cw := &countWriter{w: xw}
		hb, _ := json.Marshal(h)
		cw.Write([]byte(bundleMagic))
		cw.Write(binary.BigEndian.AppendUint32(nil, uint32(len(hb))))
		cw.Write(hb)
		if s.failpoint != nil {
			if err := s.failpoint("export:write"); err != nil {
				return err
			}
		}
		for _, li := range h.Layers {
			img, err := s.store.OpenLayer(li.ID, true)
			if err != nil {
				return err
			}
			sw := proto.NewStreamWriter(cw)
			_, err = writeLayerStream(ctx, sw, img, li.ClusterSize, li.Parent != "", 0, li.ID, proto.EncodeOptions{})
			img.Close()
			if err != nil {
				return err
			}
		}
		if cw.err != nil {
			return cw.err
		}
		rep.Stream = cw.n
		if err := xw.Close(); err != nil {
			return err
		}
		if err := bw.Flush(); err != nil {
			return err
		}
		return f.Sync()
	}()
	if err2 := f.Close(); err == nil {
		err = err2
	}
	if err != nil {
		return fail(proto.NoSpace(fmt.Errorf("export %s: %w", desktop, err)))
	}
	if fi, err := os.Stat(path); err == nil {
		rep.Bytes = fi.Size()
	}
	rep.Took = time.Since(start).Seconds()
	return rep, nil
}

type countWriter struct {
	w   io.Writer
	n   int64
	err error
}

func (c *countWriter) Write(b []byte) (int, error) {
	if c.err != nil {
		return 0, c.err
	}
	n, err := c.w.Write(b)
	c.n += int64(n)
	c.err = err
	return n, err
}

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
	var magic [len(bundleMagic) + 4]byte
	if _, err := io.ReadFull(br, magic[:]); err != nil || string(magic[:len(bundleMagic)]) != bundleMagic {
		return nil, fmt.Errorf("%s: %w: not a cvd bundle", path, proto.ErrBadRequest)
	}
	n := binary.BigEndian.Uint32(magic[len(bundleMagic):])
	if n > maxJSON {
		return nil, fmt.Errorf("%s: %w: header of %d bytes", path, proto.ErrBadRequest, n)
	}
	hb := make([]byte, n)
	if _, err := io.ReadFull(br, hb); err != nil {
		return nil, fmt.Errorf("%s: %w: truncated header", path, proto.ErrBadRequest)
	}
	var h BundleHeader
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
	if err := checkFree(l.store.Dir(), need+32<<20); err != nil {
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
			if err := skipStream(sr); err != nil {
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
		l.opts.Progress.Start("layer "+short(li.ID), li.DataBytes)
		_, done, err := fl.consume(ctx, sr)
		l.opts.Progress.Done()
		if err == nil && !done {
			err = fmt.Errorf("%w: layer %s incomplete", proto.ErrStream, short(li.ID))
		}
		if err == nil {
			err = fl.finish(ctx)
		}
		fl.close()
		if err != nil {
			os.Remove(fl.path)
			os.Remove(fl.ckptPath)
			return nil, fmt.Errorf("bundle layer %s: %w", short(li.ID), err)
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
				return nil, fmt.Errorf("bundle of %s: layer %s is neither in the bundle nor in the store", h.Desktop, short(dm.Top()))
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

// skipStream reads a cluster stream to its end frame.
func skipStream(sr *proto.StreamReader) error {
	var buf []byte
	for {
		f, _, p, err := sr.Next(buf)
		if err != nil {
			return err
		}
		buf = p
		if f.Kind == proto.KindEnd {
			return nil
		}
	}
}

// undoLease puts back the lease that an export granted (l) as it was before
// (prev, nil for none), unless it changed since.
func (s *Server) undoLease(l, prev *proto.Lease) error {
	err := s.st.update(func(tx *catalog.Tx) error {
		cur, err := activeLease(tx, l.Desktop)
		if err != nil || cur == nil || cur.ID != l.ID || !cur.Expires.Equal(l.Expires) {
			return err // someone else changed it meanwhile: leave it
		}
		if prev != nil && prev.ID == l.ID {
			return putLease(tx, prev) // a renewal, taken back
		}
		// The lease nobody received goes; the one it ended (expired) is back.
		if _, err := tx.Exec("DELETE FROM leases WHERE id = ?", l.ID); err != nil {
			return err
		}
		if prev != nil {
			prev.State, prev.Ended = "active", time.Time{}
			return putLease(tx, prev)
		}
		return nil
	})
	return err
}
