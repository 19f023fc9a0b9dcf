package syncd

import (
	"context"
	"fmt"
	"time"

	"github.com/cvd-project/cvd/catalog"
	"github.com/cvd-project/cvd/images"
)

// The administrator's operations on the server's store. The CLI calls them on the
// store directly (`cvd device`, `cvd desktop versions|rollback`).

// AddDevice registers a device bound to desktops (which must exist) and returns
// its token: it is shown once; the server keeps only its hash.
func (s *Server) AddDevice(name string, desktops []string) (*Device, string, error) {
	for _, d := range desktops {
		if _, err := s.store.Desktop(d); err != nil {
			return nil, "", err
		}
	}
	return s.st.addDevice(name, desktops, s.now())
}

// BindDevice binds an existing device to more desktops.
func (s *Server) BindDevice(name string, desktops []string) (*Device, error) {
	for _, d := range desktops {
		if _, err := s.store.Desktop(d); err != nil {
			return nil, err
		}
	}
	return s.st.bindDevice(name, desktops)
}

// RemoveDevice forgets a device: its token stops working and a lease it holds is
// broken.
func (s *Server) RemoveDevice(name string) (*Device, error) {
	return s.st.removeDevice(name, s.now())
}

// Devices lists the registered devices.
func (s *Server) Devices() ([]Device, error) { return s.st.devices() }

// Leases lists the active leases (expired ones too, until another device takes the
// desktop).
func (s *Server) Leases() ([]Lease, error) {
	var out []Lease
	err := s.st.view(func(tx *catalog.Tx) error {
		var err error
		out, err = queryLeases(tx, "state = 'active'")
		return err
	})
	return out, err
}

// BreakLease ends the desktop's lease whoever holds it. The holder's next
// check-in is kept as a conflict version.
func (s *Server) BreakLease(desktop string) (*Lease, error) {
	unlock := s.lockDesktop(desktop)
	defer unlock()
	var l *Lease
	err := s.st.update(func(tx *catalog.Tx) error {
		var err error
		l, err = activeLease(tx, desktop)
		if err != nil {
			return err
		}
		if l == nil {
			return fmt.Errorf("desktop %s: %w", desktop, ErrNoLease)
		}
		return endLease(tx, l, "broken", s.now())
	})
	if err != nil {
		return nil, err
	}
	s.log.Info("lease broken", "desktop", desktop, "device", l.DeviceName)
	return l, nil
}

// Versions returns the desktop's versions as sync knows them.
func (s *Server) Versions(desktop string) (*DesktopStatus, error) { return s.DesktopStatus(desktop) }

// Rollback makes the layers of version to the desktop's head again, as a new
// version ("rollback to N"): nothing is discarded, and a laptop that checked out an
// older head checks in as a conflict. Data on the server's tops is sealed as its
// own version first.
func (s *Server) Rollback(ctx context.Context, desktop string, to int) (*Version, error) {
	unlock := s.lockDesktop(desktop)
	defer unlock()
	if _, err := s.sealServerTops(ctx, desktop, "server changes before rollback"); err != nil {
		return nil, err
	}
	dv, err := desktopVersions(s.store, desktop)
	if err != nil {
		return nil, err
	}
	target := dv.Version(to)
	if target == nil {
		return nil, fmt.Errorf("desktop %s: version %d: %w", desktop, to, ErrNotFound)
	}
	nv := Version{Created: s.now().UTC().Truncate(time.Second), System: target.System, User: target.User,
		Kind: images.VersionRollback, Note: fmt.Sprintf("rollback to %d", to), From: dv.Head}
	dv, v, err := addVersion(s.store, desktop, nv, true, 0)
	if err != nil {
		return nil, err
	}
	if err := s.resetTops(dv, v); err != nil {
		return nil, err
	}
	nv = *v
	s.log.Info("rolled back", "desktop", desktop, "to", to, "version", nv.N)
	return &nv, nil
}
