package syncd

import (
	"context"
	"fmt"

	"github.com/cvd-project/cvd/catalog"
	"github.com/cvd-project/cvd/desktop"
	"github.com/cvd-project/cvd/syncd/proto"
)

// The administrator's operations on the server's store. The CLI calls them on the
// store directly (`cvd device`, `cvd desktop versions|rollback`).

// AddDevice registers a device in the device groups of o.Desktops (which must
// exist) and returns its token: it is shown once; the server keeps only its
// hash.
func (s *Server) AddDevice(name string, o DeviceOptions) (*Device, string, error) {
	for _, d := range o.Desktops {
		if _, err := s.store.Desktop(d); err != nil {
			return nil, "", err
		}
	}
	return addDevice(s.st, name, KindLaptop, o, s.now())
}

// AddHost registers a hypervisor host of the site and returns its token: the
// host reads the sealed layers of every desktop (to provision clones on its own
// store) and takes no lease.
// A host may also join device groups (o.Desktops): the data-center device of
// a desktop.
func (s *Server) AddHost(name string, o DeviceOptions) (*Device, string, error) {
	for _, d := range o.Desktops {
		if _, err := s.store.Desktop(d); err != nil {
			return nil, "", err
		}
	}
	return addDevice(s.st, name, KindHost, o, s.now())
}

// BindDevice puts an existing device in the device groups of more desktops,
// or changes its policy in them (policy "": full for a new binding, else
// unchanged).
func (s *Server) BindDevice(name string, desktops []string, policy string) (*Device, error) {
	for _, d := range desktops {
		if _, err := s.store.Desktop(d); err != nil {
			return nil, err
		}
	}
	return bindDevice(s.st, name, desktops, policy)
}

// SetPolicy changes a device's policy in the groups of desktops it is bound
// to (policy "" leaves it), and its hardware class (class "" leaves it).
func (s *Server) SetPolicy(name string, desktops []string, policy, class string) (*Device, error) {
	return setPolicy(s.st, name, desktops, policy, class)
}

// RemoveDevice forgets a device: its token stops working and a lease it holds is
// broken.
func (s *Server) RemoveDevice(name string) (*Device, error) {
	return removeDevice(s.st, name, s.now())
}

// Devices lists the registered devices.
func (s *Server) Devices() ([]Device, error) { return devices(s.st) }

// Leases lists the active leases (expired ones too, until another device takes the
// desktop).
func (s *Server) Leases() ([]proto.Lease, error) {
	var out []proto.Lease
	err := s.st.View(func(tx *catalog.Tx) error {
		var err error
		out, err = queryLeases(tx, "state = 'active'")
		return err
	})
	return out, err
}

// BreakLease ends the desktop's lease whoever holds it. The holder's next
// check-in is kept as a conflict version.
func (s *Server) BreakLease(desktop string) (*proto.Lease, error) {
	unlock, err := s.lockDesktop(context.Background(), desktop)
	if err != nil {
		return nil, err
	}
	defer unlock()
	var l *proto.Lease
	err = s.st.Update(func(tx *catalog.Tx) error {
		var err error
		l, err = activeLease(tx, desktop)
		if err != nil {
			return err
		}
		if l == nil {
			return fmt.Errorf("desktop %s: %w", desktop, proto.ErrNoLease)
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
func (s *Server) Versions(desktop string) (*proto.DesktopStatus, error) {
	return s.DesktopStatus(desktop)
}

// Rollback makes the layers of version to the desktop's head again, as a new
// version ("rollback to N"): nothing is discarded, and a laptop that checked out an
// older head checks in as a conflict. Data on the server's tops is sealed as its
// own version first.
func (s *Server) Rollback(ctx context.Context, dk string, to int) (*proto.Version, error) {
	unlock, err := s.lockDesktop(ctx, dk)
	if err != nil {
		return nil, err
	}
	defer unlock()
	sealed, v, err := desktop.Rollback(ctx, s.store, dk, to, s.now())
	if sealed != nil {
		s.log.Info("sealed server tops", "desktop", dk, "version", sealed.N, "note", sealed.Note)
		s.indexLater(sealed.System, sealed.User)
	}
	if err != nil {
		return nil, proto.NoSpace(err)
	}
	s.log.Info("rolled back", "desktop", dk, "to", to, "version", v.N)
	return v, nil
}
