package hypervisor

import (
	"context"
	"encoding/xml"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	libvirt "github.com/digitalocean/go-libvirt"
	"libvirt.org/go/libvirtxml"
)

// pollInterval is how often Wait and Shutdown look at a domain's state.
const pollInterval = 100 * time.Millisecond

// State is a domain's state, as libvirt's virDomainState.
type State int

// States.
const (
	StateNoState     State = State(libvirt.DomainNostate)
	StateRunning     State = State(libvirt.DomainRunning)
	StateBlocked     State = State(libvirt.DomainBlocked)
	StatePaused      State = State(libvirt.DomainPaused)
	StateShutdown    State = State(libvirt.DomainShutdown) // being shut down
	StateShutoff     State = State(libvirt.DomainShutoff)
	StateCrashed     State = State(libvirt.DomainCrashed)
	StatePMSuspended State = State(libvirt.DomainPmsuspended)
)

func (s State) String() string {
	switch s {
	case StateNoState:
		return "no state"
	case StateRunning:
		return "running"
	case StateBlocked:
		return "blocked"
	case StatePaused:
		return "paused"
	case StateShutdown:
		return "shutting down"
	case StateShutoff:
		return "shut off"
	case StateCrashed:
		return "crashed"
	case StatePMSuspended:
		return "suspended"
	}
	return fmt.Sprintf("state %d", int(s))
}

// Active reports whether a QEMU process exists for the domain.
func (s State) Active() bool { return s != StateShutoff && s != StateCrashed && s != StateNoState }

// Status is a state and the reason libvirt gives for it.
type Status struct {
	State State
	// Reason is libvirt's reason for the state, e.g. "booted", "shutdown" (the
	// guest powered off), "destroyed" (forced off), "crashed", "unknown".
	Reason string
}

func (s Status) String() string {
	if s.Reason == "" || s.Reason == "unknown" {
		return s.State.String()
	}
	return s.State.String() + " (" + s.Reason + ")"
}

var shutoffReasons = map[libvirt.DomainShutoffReason]string{
	libvirt.DomainShutoffUnknown: "unknown", libvirt.DomainShutoffShutdown: "shutdown",
	libvirt.DomainShutoffDestroyed: "destroyed", libvirt.DomainShutoffCrashed: "crashed",
	libvirt.DomainShutoffMigrated: "migrated", libvirt.DomainShutoffSaved: "saved",
	libvirt.DomainShutoffFailed: "failed", libvirt.DomainShutoffFromSnapshot: "from snapshot",
	libvirt.DomainShutoffDaemon: "daemon",
}

var runningReasons = map[libvirt.DomainRunningReason]string{
	libvirt.DomainRunningUnknown: "unknown", libvirt.DomainRunningBooted: "booted",
	libvirt.DomainRunningMigrated: "migrated", libvirt.DomainRunningRestored: "restored",
	libvirt.DomainRunningFromSnapshot: "from snapshot", libvirt.DomainRunningUnpaused: "unpaused",
	libvirt.DomainRunningMigrationCanceled: "migration canceled", libvirt.DomainRunningSaveCanceled: "save canceled",
	libvirt.DomainRunningWakeup: "wakeup", libvirt.DomainRunningCrashed: "crashed",
	libvirt.DomainRunningPostcopy: "postcopy",
}

func statusOf(state, reason int32) Status {
	s := Status{State: State(state)}
	switch s.State {
	case StateShutoff:
		s.Reason = shutoffReasons[libvirt.DomainShutoffReason(reason)]
	case StateRunning:
		s.Reason = runningReasons[libvirt.DomainRunningReason(reason)]
	}
	if s.Reason == "" {
		s.Reason = fmt.Sprintf("reason %d", reason)
	}
	return s
}

// lookup finds a domain by name.
func (c *Conn) lookup(ctx context.Context, op, name string) (libvirt.Domain, error) {
	if err := checkName(op, name); err != nil {
		return libvirt.Domain{}, err
	}
	var d libvirt.Domain
	err := c.do(ctx, op, name, func() (err error) {
		d, err = c.l.DomainLookupByName(name)
		return err
	})
	return d, err
}

// Define defines (or redefines) the domain that spec describes, persistently.
// An empty spec.Type takes c.DomainType(). Redefining a domain (same name and
// UUID) replaces its definition, for a running domain from its next start; a
// name taken by a domain with another UUID gives ErrExists. DumpXML shows what
// libvirt stored.
func (c *Conn) Define(ctx context.Context, spec DomainSpec) error {
	if spec.Type == "" {
		spec.Type = c.virt
	}
	x, err := spec.XML()
	if err != nil {
		var e *Error
		if errors.As(err, &e) {
			e.Op = "define"
		}
		return err
	}
	if err := c.defineSecrets(ctx, spec); err != nil {
		return err
	}
	return c.DefineXML(ctx, spec.Name, x)
}

// DefineKeeping defines spec's domain, keeping what a device's user changed:
// a domain of that name defined already takes spec's disks (their chains and
// the seed) and keeps every other element of its persistent definition
// (memory, vCPUs, interfaces, boot, edits made through libvirt); a new name is
// defined from spec whole.
func (c *Conn) DefineKeeping(ctx context.Context, spec DomainSpec) error {
	const op = "define"
	d, err := c.lookup(ctx, op, spec.Name)
	if errors.Is(err, ErrNotFound) {
		return c.Define(ctx, spec)
	} else if err != nil {
		return err
	}
	var x string
	err = c.do(ctx, op, spec.Name, func() (err error) {
		x, err = c.l.DomainGetXMLDesc(d, libvirt.DomainXMLInactive)
		return err
	})
	if err != nil {
		return err
	}
	var cur libvirtxml.Domain
	if err := cur.Unmarshal(x); err != nil {
		return opErr(op, spec.Name, ErrInvalidSpec, "the defined domain's XML: %v", err)
	}
	if spec.Type == "" {
		spec.Type = cur.Type
	}
	want, err := spec.domain()
	if err != nil {
		return err
	}
	if cur.Devices == nil {
		cur.Devices = &libvirtxml.DomainDeviceList{}
	}
	cur.Devices.Disks = want.Devices.Disks
	out, err := cur.Marshal()
	if err != nil {
		return opErr(op, spec.Name, ErrInvalidSpec, "%v", err)
	}
	if err := c.defineSecrets(ctx, spec); err != nil {
		return err
	}
	return c.DefineXML(ctx, spec.Name, out)
}

// DefineXML defines a domain from XML (as DomainSpec.XML renders, possibly
// edited). name is only used in errors.
func (c *Conn) DefineXML(ctx context.Context, name, domainXML string) error {
	c.defineMu.Lock()
	defer c.defineMu.Unlock()
	define := func() error {
		return c.do(ctx, "define", name, func() error {
			_, err := c.l.DomainDefineXMLFlags(domainXML, libvirt.DomainDefineValidate)
			return err
		})
	}
	err := define()
	for try := 0; err != nil && isSchemaRace(err) && try < 3; try++ {
		// Another process's define raced the schema load in libvirtd: again.
		select {
		case <-ctx.Done():
			return err
		case <-time.After(time.Duration(50*(try+1)) * time.Millisecond):
		}
		err = define()
	}
	return err
}

// isSchemaRace recognizes libvirtd's error when two validated defines load the
// domain schema at once.
func isSchemaRace(err error) bool {
	msg := err.Error()
	return strings.Contains(msg, "Unable to parse RNG") || strings.Contains(msg, "is not exported by type library")
}

// Start boots a defined domain. Starting a running domain gives ErrRunning.
func (c *Conn) Start(ctx context.Context, name string) error {
	const op = "start"
	d, err := c.lookup(ctx, op, name)
	if err != nil {
		return err
	}
	s, err := c.status(ctx, op, d)
	if err != nil {
		return err
	}
	if s.State.Active() {
		return opErr(op, name, ErrRunning, "it is already %s", s)
	}
	return c.do(ctx, op, name, func() error { return c.l.DomainCreate(d) })
}

// Status returns a domain's state and its reason.
func (c *Conn) Status(ctx context.Context, name string) (Status, error) {
	d, err := c.lookup(ctx, "status", name)
	if err != nil {
		return Status{}, err
	}
	return c.status(ctx, "status", d)
}

// State returns a domain's state.
func (c *Conn) State(ctx context.Context, name string) (State, error) {
	s, err := c.Status(ctx, name)
	return s.State, err
}

func (c *Conn) status(ctx context.Context, op string, d libvirt.Domain) (Status, error) {
	var st, reason int32
	err := c.do(ctx, op, d.Name, func() (err error) {
		st, reason, err = c.l.DomainGetState(d, 0)
		return err
	})
	return statusOf(st, reason), err
}

// Wait waits until the domain is shut off (or crashed), polling its state, and
// returns the final status. It never subscribes to libvirt events, so it cannot
// wedge the connection (see Events for why that matters).
func (c *Conn) Wait(ctx context.Context, name string) (Status, error) {
	d, err := c.lookup(ctx, "wait", name)
	if err != nil {
		return Status{}, err
	}
	return c.wait(ctx, "wait", d)
}

func (c *Conn) wait(ctx context.Context, op string, d libvirt.Domain) (Status, error) {
	t := time.NewTicker(pollInterval)
	defer t.Stop()
	for {
		s, err := c.status(ctx, op, d)
		if err != nil {
			return s, err
		}
		if !s.State.Active() {
			return s, nil
		}
		select {
		case <-ctx.Done():
			return s, &Error{Op: op, Domain: d.Name, Err: ctx.Err(), Msg: "still " + s.String()}
		case <-t.C:
		}
	}
}

// ShutdownResult says how a domain stopped.
type ShutdownResult struct {
	// Forced: the guest did not power off within the timeout after the ACPI
	// request and was destroyed.
	Forced bool
	// AlreadyOff: the domain was not running.
	AlreadyOff bool
	Elapsed    time.Duration
	Status     Status // the final status
	// Message says what happened, in a sentence fit for a user.
	Message string
}

// Shutdown asks the guest to power off (an ACPI power button press) and waits up
// to timeout for it; a guest still running then is destroyed, and the result
// says Forced. A domain already shut off is not an error (AlreadyOff). If ctx
// ends first, Shutdown returns its error and leaves the domain as it is.
func (c *Conn) Shutdown(ctx context.Context, name string, timeout time.Duration) (ShutdownResult, error) {
	const op = "shutdown"
	start := time.Now()
	d, err := c.lookup(ctx, op, name)
	if err != nil {
		return ShutdownResult{}, err
	}
	s, err := c.status(ctx, op, d)
	if err != nil {
		return ShutdownResult{}, err
	}
	if !s.State.Active() {
		return ShutdownResult{AlreadyOff: true, Status: s, Elapsed: time.Since(start),
			Message: fmt.Sprintf("domain %q was already %s", name, s)}, nil
	}
	err = c.do(ctx, op, name, func() error { return c.l.DomainShutdownFlags(d, libvirt.DomainShutdownAcpiPowerBtn) })
	if errors.Is(err, ErrUnsupported) {
		// Drivers without the ACPI flag (the test driver): their own default.
		err = c.do(ctx, op, name, func() error { return c.l.DomainShutdownFlags(d, 0) })
	}
	if err != nil && !errors.Is(err, ErrNotRunning) {
		return ShutdownResult{}, err
	}
	wctx, cancel := context.WithTimeout(ctx, timeout)
	s, err = c.wait(wctx, op, d)
	cancel()
	if err == nil {
		return ShutdownResult{Status: s, Elapsed: time.Since(start),
			Message: fmt.Sprintf("domain %q shut down after %s", name, time.Since(start).Round(time.Millisecond))}, nil
	}
	if ctx.Err() != nil || !errors.Is(err, context.DeadlineExceeded) {
		return ShutdownResult{}, err
	}
	// The guest ignored the request: pull the plug.
	err = c.do(ctx, op, name, func() error { return c.l.DomainDestroyFlags(d, libvirt.DomainDestroyDefault) })
	forced := true
	if err != nil {
		if !errors.Is(err, ErrNotRunning) {
			return ShutdownResult{}, err
		}
		forced = false // it powered off at the last moment
	}
	s, err = c.wait(ctx, op, d)
	if err != nil {
		return ShutdownResult{}, err
	}
	r := ShutdownResult{Forced: forced, Status: s, Elapsed: time.Since(start)}
	if forced {
		r.Message = fmt.Sprintf("domain %q did not shut down within %s of the ACPI shutdown request; destroyed it (forced off)", name, timeout)
	} else {
		r.Message = fmt.Sprintf("domain %q shut down after %s", name, r.Elapsed.Round(time.Millisecond))
	}
	return r, nil
}

// Destroy stops a domain at once (libvirt's destroy: QEMU is terminated, the
// guest gets no chance to flush). A domain not running gives ErrNotRunning.
func (c *Conn) Destroy(ctx context.Context, name string) error {
	d, err := c.lookup(ctx, "destroy", name)
	if err != nil {
		return err
	}
	return c.do(ctx, "destroy", name, func() error { return c.l.DomainDestroyFlags(d, libvirt.DomainDestroyDefault) })
}

// UndefineFlags choose what Undefine also removes.
type UndefineFlags uint

const (
	// UndefineSnapshots also drops libvirt's snapshot metadata (not the files).
	UndefineSnapshots UndefineFlags = 1 << iota
	// UndefineCheckpoints also drops libvirt's checkpoint metadata.
	UndefineCheckpoints
	// UndefineNVRAM also removes the domain's NVRAM file (UEFI guests).
	UndefineNVRAM
)

// Undefine removes a shut-off domain's definition; its disk files stay. A
// running domain gives ErrRunning: stop it first.
func (c *Conn) Undefine(ctx context.Context, name string, flags UndefineFlags) error {
	const op = "undefine"
	d, err := c.lookup(ctx, op, name)
	if err != nil {
		return err
	}
	s, err := c.status(ctx, op, d)
	if err != nil {
		return err
	}
	if s.State.Active() {
		return opErr(op, name, ErrRunning, "it is %s; shut it down first", s)
	}
	var f libvirt.DomainUndefineFlagsValues
	if flags&UndefineSnapshots != 0 {
		f |= libvirt.DomainUndefineSnapshotsMetadata
	}
	if flags&UndefineCheckpoints != 0 {
		f |= libvirt.DomainUndefineCheckpointsMetadata
	}
	if flags&UndefineNVRAM != 0 {
		f |= libvirt.DomainUndefineNvram
	}
	var x string
	if err := c.do(ctx, op, name, func() (err error) { x, err = c.l.DomainGetXMLDesc(d, libvirt.DomainXMLInactive); return err }); err != nil {
		return err
	}
	if err := c.do(ctx, op, name, func() error { return c.l.DomainUndefineFlags(d, f) }); err != nil {
		return err
	}
	return c.undefineSecrets(ctx, name, x)
}

// DumpXML returns the domain's XML: the live one while it runs (with the backing
// chain as QEMU opened it), else the persistent definition.
func (c *Conn) DumpXML(ctx context.Context, name string) (string, error) {
	d, err := c.lookup(ctx, "dumpxml", name)
	if err != nil {
		return "", err
	}
	return c.xml(ctx, "dumpxml", d)
}

func (c *Conn) xml(ctx context.Context, op string, d libvirt.Domain) (string, error) {
	var x string
	err := c.do(ctx, op, d.Name, func() (err error) {
		x, err = c.l.DomainGetXMLDesc(d, 0)
		return err
	})
	return x, err
}

// Display is the console address of a running domain as `virsh domdisplay`
// gives it ("vnc://127.0.0.1:0"); ErrNotRunning when it is not running or has
// no VNC console.
func (c *Conn) Display(ctx context.Context, name string) (string, error) {
	const op = "display"
	d, err := c.lookup(ctx, op, name)
	if err != nil {
		return "", err
	}
	x, err := c.xml(ctx, op, d)
	if err != nil {
		return "", err
	}
	var dom libvirtxml.Domain
	if err := dom.Unmarshal(x); err != nil {
		return "", opErr(op, name, ErrInvalidSpec, "%v", err)
	}
	if dom.Devices != nil {
		for _, g := range dom.Devices.Graphics {
			if v := g.VNC; v != nil && v.Port > 0 {
				host := v.Listen
				if host == "" || host == "0.0.0.0" {
					host = "localhost"
				}
				return fmt.Sprintf("vnc://%s:%d", host, v.Port-5900), nil
			}
		}
	}
	return "", opErr(op, name, ErrNotRunning, "no VNC console: the domain is not running or has none")
}

// DomainInfo describes a defined domain.
type DomainInfo struct {
	Name   string
	UUID   string
	Status Status
	// Managed: the domain carries cvd's metadata element.
	Managed  bool
	Metadata Metadata
	Disks    []DiskInfo
}

// DiskInfo is one disk of a domain as libvirt reports it.
type DiskInfo struct {
	Target   string
	Format   string
	ReadOnly bool
	// Chain is the backing chain top first: the paths and formats libvirt
	// declares (for a running domain, as QEMU opened them).
	Chain []Layer
}

// Layer is one element of a disk's chain.
type Layer struct {
	Path   string
	Format string
}

// Info describes a domain: state, cvd metadata, disks and their chains.
func (c *Conn) Info(ctx context.Context, name string) (DomainInfo, error) {
	d, err := c.lookup(ctx, "info", name)
	if err != nil {
		return DomainInfo{}, err
	}
	return c.info(ctx, "info", d)
}

func (c *Conn) info(ctx context.Context, op string, d libvirt.Domain) (DomainInfo, error) {
	x, err := c.xml(ctx, op, d)
	if err != nil {
		return DomainInfo{}, err
	}
	s, err := c.status(ctx, op, d)
	if err != nil {
		return DomainInfo{}, err
	}
	return parseInfo(op, d.Name, x, s)
}

func parseInfo(op, name, x string, s Status) (DomainInfo, error) {
	var dx libvirtxml.Domain
	if err := dx.Unmarshal(x); err != nil {
		return DomainInfo{}, &Error{Op: op, Domain: name, Msg: "parse domain XML: " + err.Error()}
	}
	info := DomainInfo{Name: dx.Name, UUID: dx.UUID, Status: s}
	if dx.Metadata != nil {
		// innerxml holds every element of <metadata>; find ours by namespace.
		if m, ok := findMetadata(dx.Metadata.XML); ok {
			info.Managed, info.Metadata = true, m
		}
	}
	if dx.Devices != nil {
		for _, dd := range dx.Devices.Disks {
			if dd.Device != "" && dd.Device != "disk" || dd.Target == nil {
				continue
			}
			di := DiskInfo{Target: dd.Target.Dev, ReadOnly: dd.ReadOnly != nil}
			if dd.Driver != nil {
				di.Format = dd.Driver.Type
			}
			if dd.Source != nil && dd.Source.File != nil {
				di.Chain = append(di.Chain, Layer{Path: dd.Source.File.File, Format: di.Format})
			}
			// cvd's layers are files; an element without a file source (the
			// empty terminator) ends the chain.
			for bs := dd.BackingStore; bs != nil && bs.Source != nil && bs.Source.File != nil; bs = bs.BackingStore {
				l := Layer{Path: bs.Source.File.File}
				if bs.Format != nil {
					l.Format = bs.Format.Type
				}
				di.Chain = append(di.Chain, l)
			}
			info.Disks = append(info.Disks, di)
		}
	}
	return info, nil
}

// findMetadata looks for cvd's element among the children of <metadata>.
func findMetadata(inner string) (Metadata, bool) {
	var wrapper struct {
		Clones []metaIn `xml:"https://cvd.dev/xmlns/clone/1 clone"`
	}
	if err := xml.Unmarshal([]byte("<m>"+inner+"</m>"), &wrapper); err != nil || len(wrapper.Clones) == 0 {
		return Metadata{}, false
	}
	return Metadata{Desktop: wrapper.Clones[0].Desktop, Clone: wrapper.Clones[0].Clone}, true
}

// ListManaged lists the domains that carry cvd's metadata, running or not,
// sorted by name.
func (c *Conn) ListManaged(ctx context.Context) ([]DomainInfo, error) {
	const op = "list"
	var doms []libvirt.Domain
	err := c.do(ctx, op, "", func() (err error) {
		doms, _, err = c.l.ConnectListAllDomains(1, libvirt.ConnectListDomainsActive|libvirt.ConnectListDomainsInactive)
		return err
	})
	if err != nil {
		return nil, err
	}
	var out []DomainInfo
	for _, d := range doms {
		// Cheap test first: only domains with our element are described fully.
		err := c.do(ctx, op, d.Name, func() error {
			_, err := c.l.DomainGetMetadata(d, int32(libvirt.DomainMetadataElement), libvirt.OptString{MetadataNS}, libvirt.DomainAffectCurrent)
			return err
		})
		if err != nil {
			if isCode(err, libvirt.ErrNoDomainMetadata) || errors.Is(err, ErrNotFound) {
				continue // not ours, or gone meanwhile
			}
			return nil, err
		}
		info, err := c.info(ctx, op, d)
		if err != nil {
			if errors.Is(err, ErrNotFound) {
				continue
			}
			return nil, err
		}
		if info.Managed {
			out = append(out, info)
		}
	}
	slices.SortFunc(out, func(a, b DomainInfo) int { return strings.Compare(a.Name, b.Name) })
	return out, nil
}
