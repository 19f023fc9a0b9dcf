package syncd

import (
	"bufio"
	"context"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"time"

	"github.com/ulikunitz/xz"

	"github.com/cvd-project/cvd/catalog"
	"github.com/cvd-project/cvd/syncd/proto"
)

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
	Header proto.BundleHeader `json:"header"`
	Bytes  int64              `json:"bytes"`     // of the bundle file
	Stream int64              `json:"raw_bytes"` // before xz
	Layers int                `json:"layers"`    // layers in the bundle
	Took   float64            `json:"seconds"`
}

// Export writes the head version of desktop into an xz bundle at path (which must
// not exist). Like a check-out, it seals the server's tops first when they hold
// data.
func (s *Server) Export(ctx context.Context, desktop, path string, opts ExportOptions) (*ExportReport, error) {
	start := time.Now()
	if opts.TTL == 0 {
		opts.TTL = 7 * 24 * time.Hour
	}
	unlock, err := s.lockDesktop(ctx, desktop)
	if err != nil {
		return nil, err
	}
	defer unlock()
	if _, err := s.sealServerTops(ctx, desktop, "export seal"); err != nil {
		return nil, err
	}
	h := proto.BundleHeader{Desktop: desktop, Created: s.now().UTC(), Expires: s.now().Add(opts.TTL).UTC()}
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
	err = s.st.Update(func(tx *catalog.Tx) error {
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
		cw.Write([]byte(proto.BundleMagic))
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

// undoLease puts back the lease that an export granted (l) as it was before
// (prev, nil for none), unless it changed since.
func (s *Server) undoLease(l, prev *proto.Lease) error {
	err := s.st.Update(func(tx *catalog.Tx) error {
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
