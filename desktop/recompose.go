package desktop

import (
	"context"
	"fmt"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/cvd-project/cvd/disk"
	"github.com/cvd-project/cvd/files"
	"github.com/cvd-project/cvd/images"
	"github.com/cvd-project/cvd/overlay"
)

// Policy says what Recompose does with a desktop's own system delta.
type Policy string

// Recompose policies.
const (
	// PolicyKeep moves a desktop with its delta when nothing in the delta
	// collides with what changed between the old and new lower layers, and
	// leaves a desktop whose delta collides where it is (listed with its
	// conflicts). The default.
	PolicyKeep Policy = "keep"
	// PolicyRefresh discards the system delta: the desktop gets an empty system
	// top on the new layers. Its user disk stays.
	PolicyRefresh Policy = "refresh"
	// PolicyForce keeps the delta over the new layers even where they collide:
	// the delta's clusters win.
	PolicyForce Policy = "force"
	// PolicyMerge moves a desktop whose delta collides by files: its own file
	// changes are written onto an empty top over the new layers (see
	// FileMerge). A desktop without collisions moves by blocks, as with keep.
	PolicyMerge Policy = "merge"
)

// ParsePolicy checks a policy name ("" is keep).
func ParsePolicy(s string) (Policy, error) {
	switch Policy(s) {
	case "":
		return PolicyKeep, nil
	case PolicyKeep, PolicyRefresh, PolicyForce, PolicyMerge:
		return Policy(s), nil
	}
	return "", fmt.Errorf("%w: policy %q (use keep, refresh, force or merge)", images.ErrInvalid, s)
}

// Actions a recompose takes for a desktop.
const (
	ActionMove     = "move"     // onto the new layers with its delta
	ActionRefresh  = "refresh"  // onto the new layers without its system delta
	ActionMerge    = "merge"    // onto the new layers with its file changes (policy merge)
	ActionConflict = "conflict" // left where it is: its delta collides (policy keep)
	ActionMark     = "mark"     // in use: marked to switch at its next start (ApplySwitch)
	ActionNone     = "none"     // already on the new layers
)

// RecomposeSpec says which desktops move onto which layers.
type RecomposeSpec struct {
	// Desktops names the desktops; Using selects instead every desktop whose
	// head system chain holds that layer (a layer reference).
	Desktops []string
	Using    string
	// Base and Apps are the new lower layers, as in images.DesktopSpec: apps in
	// order, each captured on the one before; Base may be left out when Apps
	// are given (it is then the base of the first app's chain).
	Base string
	Apps []string
	// Policy for the desktops' own system deltas ("" is keep).
	Policy Policy
	// DryRun plans and reports without changing anything.
	DryRun bool
	// ForceCorruptingMetadata lets policy force move a desktop whose
	// conflicts hold file-system metadata (which corrupts that file system).
	ForceCorruptingMetadata bool
	// Rules decide, for policy merge, whose version of a path both the
	// desktop and the new layers changed wins (nil: files.DefaultRules).
	Rules []files.Rule
	// InUse reports a desktop whose system top may be open (a running VM, a
	// check-out): it is not moved now but marked to switch at its next start
	// (Desktop.Switch, carried out by ApplySwitch). Nil means: a desktop with a
	// lease is in use.
	InUse func(d *images.Desktop) (bool, error)
	// Workers bounds the desktops planned and applied at once (0: 2).
	Workers int
}

// Cost is what applying a plan reads and writes.
type Cost struct {
	ReadClusters  int64 `json:"read-clusters"`
	ReadBytes     int64 `json:"read-bytes"`
	WriteClusters int64 `json:"write-clusters"`
	WriteBytes    int64 `json:"write-bytes"`
}

func (c *Cost) add(o Cost) {
	c.ReadClusters += o.ReadClusters
	c.ReadBytes += o.ReadBytes
	c.WriteClusters += o.WriteClusters
	c.WriteBytes += o.WriteBytes
}

// DesktopPlan is what a recompose does, or would do, to one desktop.
type DesktopPlan struct {
	Desktop  string `json:"desktop"`
	FromHead int    `json:"from-head"`
	// From is the layer the system disk stands on; OldLower the top of its base
	// and app layers (From, or below the desktop's own version layers);
	// NewLower the top of the new base and app layers.
	From     string `json:"from"`
	OldLower string `json:"old-lower"`
	NewLower string `json:"new-lower"`
	// OwnVersions are the desktop's own version layers between OldLower and its
	// top (top first): they move with the delta as one new layer.
	OwnVersions []string `json:"own-versions,omitempty"`
	// LowerDiff counts the clusters that differ between the old and new lower
	// layers (Granularity bytes each).
	Granularity       int64 `json:"granularity"`
	LowerDiffClusters int64 `json:"lower-diff-clusters"`
	LowerDiffBytes    int64 `json:"lower-diff-bytes"`
	// Delta counts what the desktop's own layers (versions and top) allocate.
	DeltaClusters int64 `json:"delta-clusters"`
	DeltaBytes    int64 `json:"delta-bytes"`
	// Conflicts are the clusters that changed between the old and new lower
	// layers and that the desktop's own delta also holds.
	Conflicts        []overlay.Range `json:"conflicts"`
	ConflictClusters int64           `json:"conflict-clusters"`
	ConflictBytes    int64           `json:"conflict-bytes"`
	// MetadataConflicts are the parts of the conflicts that hold ext4
	// metadata (superblock, group descriptors, bitmaps, inode tables,
	// journal) in the desktop's disk or the new layers: keeping the
	// desktop's blocks over the new layer's there corrupts the file system.
	// MetadataUnknown says a file system was found whose metadata could not
	// be placed (then every conflict may be metadata).
	MetadataConflicts     []files.Range `json:"metadata-conflicts,omitempty"`
	MetadataConflictBytes int64         `json:"metadata-conflict-bytes,omitempty"`
	MetadataUnknown       string        `json:"metadata-unknown,omitempty"`
	// ConflictFiles are the conflicts as files: those of the desktop's disk
	// and of the new layers whose blocks the conflicts hold.
	ConflictFiles []ConflictFile `json:"conflict-files,omitempty"`
	// Refused says why policy force or merge did not move the desktop.
	Refused string `json:"refused,omitempty"`
	// Files is what policy merge writes, file system by file system.
	Files []FileMerge `json:"files,omitempty"`
	// Cost of applying Action.
	Cost   Cost   `json:"cost"`
	Action string `json:"action"`
	InUse  bool   `json:"in-use,omitempty"`
	// After applying: the new head version and the layer it stands on.
	Applied    bool   `json:"applied"`
	NewVersion int    `json:"new-version,omitempty"`
	NewSystem  string `json:"new-system,omitempty"`
	Error      string `json:"error,omitempty"`
}

// RecomposeReport is the outcome of Recompose.
type RecomposeReport struct {
	DryRun   bool          `json:"dry-run"`
	Policy   Policy        `json:"policy"`
	NewLower string        `json:"new-lower"`
	Names    []string      `json:"new-lower-names,omitempty"`
	Desktops []DesktopPlan `json:"desktops"`
	// Diffs computed between old and new lower layers (shared by the desktops
	// on the same old lower layers) and what they read.
	LowerDiffs    int     `json:"lower-diffs"`
	LowerDiffRead int64   `json:"lower-diff-bytes-read"`
	Moved         int     `json:"moved"`
	Merged        int     `json:"merged"`
	Refreshed     int     `json:"refreshed"`
	LeftConflicts int     `json:"left-with-conflicts"`
	Marked        int     `json:"marked"`
	Unchanged     int     `json:"unchanged"`
	Failed        int     `json:"failed"`
	Cost          Cost    `json:"cost"`
	PlanSeconds   float64 `json:"plan-seconds"`
	ApplySeconds  float64 `json:"apply-seconds"`
}

// lowerDiff is the diff between two lower layers, shared by every desktop that
// moves from one to the other.
type lowerDiff struct {
	once   sync.Once
	ranges overlay.RangeSet
	g      int64
	bytes  int64
	read   int64
	err    error
}

// planner computes desktop plans against one new lower layer.
type planner struct {
	st       *images.Store
	newLower string
	newImg   disk.Image // opened once, read-only, shared by the goroutines
	// forceMeta: policy force moves desktops with metadata conflicts too.
	forceMeta bool
	rules     []files.Rule
	newMeta   metaOnce // the new layers' file-system metadata
	mu        sync.Mutex
	diffs     map[string]*lowerDiff // by old lower layer ID
}

func (pl *planner) diff(ctx context.Context, oldLower disk.Image, oldID string) *lowerDiff {
	pl.mu.Lock()
	d := pl.diffs[oldID]
	if d == nil {
		d = &lowerDiff{}
		pl.diffs[oldID] = d
	}
	pl.mu.Unlock()
	d.once.Do(func() {
		rep, err := overlay.DiffStats(ctx, oldLower, pl.newImg)
		if err != nil {
			d.err = err
			return
		}
		d.ranges, d.g, d.bytes, d.read = overlay.RangeSet(rep.Ranges), rep.Granularity, rep.Bytes, rep.BytesRead
	})
	return d
}

// desktopChain is a desktop's system disk opened read-only, split into its own
// layers and its lower layers.
type desktopChain struct {
	top      disk.Image   // the writable top (opened read-only)
	own      []disk.Image // top, then the desktop's own version layers
	versions []string     // IDs of the own version layers, top first
	oldLower string       // ID of the top lower layer
	lower    disk.Image   // the top lower layer, in top's chain
}

func openDesktopChain(st *images.Store, d *images.Desktop) (*desktopChain, error) {
	h := d.HeadVersion()
	if h == nil {
		return nil, fmt.Errorf("desktop %s: no head version %d", d.Name, d.Head)
	}
	chain, err := st.Chain(h.System)
	if err != nil {
		return nil, fmt.Errorf("desktop %s: %w", d.Name, err)
	}
	dc := &desktopChain{}
	i := 0
	for i < len(chain) && chain[i].Kind == images.KindVersion {
		dc.versions = append(dc.versions, chain[i].ID)
		i++
	}
	if i == len(chain) {
		return nil, fmt.Errorf("desktop %s: its chain has no base or app layer", d.Name)
	}
	dc.oldLower = chain[i].ID
	top, err := st.OpenTop(d.SystemDisk, true, false)
	if err != nil {
		return nil, fmt.Errorf("desktop %s: %w", d.Name, err)
	}
	layers := disk.Layers(top)
	if len(layers) < 2+len(dc.versions) || !overlay.SameFile(layers[1].Info().Path, st.LayerPath(h.System)) {
		top.Close()
		return nil, fmt.Errorf("desktop %s: its system disk %s does not stand on its head layer %s", d.Name, d.SystemDisk, images.ShortID(h.System))
	}
	dc.top = top
	dc.own = layers[:1+len(dc.versions)]
	dc.lower = layers[1+len(dc.versions)]
	return dc, nil
}

func (dc *desktopChain) Close() error { return dc.top.Close() }

// ownAlloc lists what the desktop's own layers allocate (data or zero) and
// counts their data clusters and bytes (in each layer's clusters).
func (dc *desktopChain) ownAlloc() (s overlay.RangeSet, dataClusters, dataBytes int64, err error) {
	for _, l := range dc.own {
		exts, err := l.MapLayer(0, l.Size())
		if err != nil {
			return nil, 0, 0, fmt.Errorf("map %s: %w", l.Info().Path, err)
		}
		cs := int64(l.Info().ClusterSize)
		for _, e := range exts {
			if e.State == disk.Unallocated {
				continue
			}
			s.Add(e.Off, e.Len)
			if e.State == disk.Data {
				dataClusters += (e.Len + cs - 1) / cs
				dataBytes += e.Len
			}
		}
	}
	return s.Normalize(), dataClusters, dataBytes, nil
}

// intersect returns the ranges both a and b (normalized) cover.
func intersect(a, b overlay.RangeSet) overlay.RangeSet {
	var out overlay.RangeSet
	i, j := 0, 0
	for i < len(a) && j < len(b) {
		lo, hi := max(a[i].Off, b[j].Off), min(a[i].End(), b[j].End())
		if lo < hi {
			out = append(out, overlay.Range{Off: lo, Len: hi - lo})
		}
		if a[i].End() < b[j].End() {
			i++
		} else {
			j++
		}
	}
	return out
}

// plan works out what happens to desktop d.
func (pl *planner) plan(ctx context.Context, d *images.Desktop, policy Policy, inUse bool) (*DesktopPlan, error) {
	h := d.HeadVersion()
	if h == nil {
		return nil, fmt.Errorf("desktop %s: no head version", d.Name)
	}
	p := &DesktopPlan{Desktop: d.Name, FromHead: d.Head, From: h.System, NewLower: pl.newLower, InUse: inUse, Conflicts: []overlay.Range{}}
	dc, err := openDesktopChain(pl.st, d)
	if err != nil {
		return nil, err
	}
	defer dc.Close()
	p.OldLower, p.OwnVersions = dc.oldLower, dc.versions
	own, dataClusters, dataBytes, err := dc.ownAlloc()
	if err != nil {
		return nil, err
	}
	p.DeltaClusters, p.DeltaBytes = dataClusters, dataBytes
	if dc.oldLower == pl.newLower {
		p.Action = ActionNone
		return p, nil
	}
	ld := pl.diff(ctx, dc.lower, dc.oldLower)
	if ld.err != nil {
		return nil, fmt.Errorf("desktop %s: %w", d.Name, ld.err)
	}
	p.Granularity, p.LowerDiffClusters, p.LowerDiffBytes = ld.g, ld.bytes/ld.g, ld.bytes
	conf := intersect(ld.ranges, own.Align(ld.g, 0, max(dc.top.Size(), pl.newImg.Size())))
	for _, r := range conf {
		p.Conflicts = append(p.Conflicts, r)
		p.ConflictBytes += r.Len
		p.ConflictClusters += (r.Len + ld.g - 1) / ld.g
	}
	if len(conf) > 0 {
		pl.metadataConflicts(ctx, dc.top, conf, p)
		if policy != PolicyRefresh {
			pl.conflictFiles(ctx, dc.top, conf, p)
		}
	}
	switch {
	case policy == PolicyRefresh:
		p.Action = ActionRefresh
	case policy == PolicyKeep && p.ConflictClusters > 0:
		p.Action = ActionConflict
	case policy == PolicyMerge && p.ConflictClusters > 0:
		if err := pl.planMerge(ctx, dc, p); err != nil {
			return nil, fmt.Errorf("desktop %s: %w", d.Name, err)
		}
		p.Action = ActionMerge
		if p.Refused != "" {
			p.Action = ActionConflict
		}
	case policy == PolicyForce && (len(p.MetadataConflicts) > 0 || p.MetadataUnknown != "") && !pl.forceMeta:
		p.Action = ActionConflict
		if p.MetadataUnknown != "" {
			p.Refused = "policy force refused: cannot tell which conflicting clusters hold file-system metadata (" + p.MetadataUnknown + ")"
		} else {
			p.Refused = fmt.Sprintf("policy force refused: %d bytes of the conflicts hold file-system metadata (%s); forcing would corrupt the file system (refresh, or --force-corrupting-metadata)",
				p.MetadataConflictBytes, metadataKinds(p.MetadataConflicts))
		}
	default:
		p.Action = ActionMove
	}
	merge := p.Action == ActionMerge
	if inUse && (p.Action == ActionMove || p.Action == ActionRefresh || merge) {
		p.Action = ActionMark
	}
	if !merge && (p.Action == ActionMove || (p.Action == ActionMark && policy != PolicyRefresh)) {
		p.Cost = dc.moveCost()
	}
	return p, nil
}

// moveCost is what moving the delta costs: the top's file is copied whole (a
// byte copy of its clusters, then a new backing name), and the own version
// layers are merged into one new layer, written once as an overlay and once more
// as the sealed copy.
func (dc *desktopChain) moveCost() Cost {
	var c Cost
	fs := overlay.FileSize(dc.top.Info().Path)
	cs := int64(dc.top.Info().ClusterSize)
	c.ReadBytes, c.WriteBytes = fs, fs
	c.ReadClusters, c.WriteClusters = (fs+cs-1)/cs, (fs+cs-1)/cs
	for _, l := range dc.own[1:] {
		exts, err := l.MapLayer(0, l.Size())
		if err != nil {
			continue
		}
		lcs := int64(l.Info().ClusterSize)
		for _, e := range exts {
			if e.State == disk.Data {
				n := (e.Len + lcs - 1) / lcs
				c.ReadClusters += 2 * n
				c.ReadBytes += 2 * e.Len
				c.WriteClusters += 2 * n
				c.WriteBytes += 2 * e.Len
			}
		}
	}
	return c
}

// resolveLower checks the new lower layers and returns the ID of their top.
func resolveLower(st *images.Store, base string, apps []string) (string, error) {
	if base == "" && len(apps) == 0 {
		return "", fmt.Errorf("%w: give the new base (--base) and/or apps (--app)", images.ErrInvalid)
	}
	var top string
	if base != "" {
		l, err := st.Layer(base)
		if err != nil {
			return "", fmt.Errorf("base %s: %w", base, err)
		}
		if l.Kind != images.KindBase {
			return "", fmt.Errorf("%w: %s is a %s layer, not a base", images.ErrInvalid, base, l.Kind)
		}
		top = l.ID
	}
	for _, a := range apps {
		l, err := st.Layer(a)
		if err != nil {
			return "", fmt.Errorf("app %s: %w", a, err)
		}
		if top != "" && l.Parent != top {
			return "", fmt.Errorf("%w: app %s was captured on layer %s, not on %s", images.ErrNoParent, a, images.ShortID(l.Parent), images.ShortID(top))
		}
		top = l.ID
	}
	chain, err := st.Chain(top)
	if err != nil {
		return "", err
	}
	for _, l := range chain {
		if l.Kind == images.KindVersion {
			return "", fmt.Errorf("%w: layer %s is a version layer: recompose onto base and app layers", images.ErrInvalid, images.ShortID(l.ID))
		}
	}
	if chain[len(chain)-1].Kind != images.KindBase {
		return "", fmt.Errorf("%w: the chain of %s does not end in a base layer", images.ErrInvalid, images.ShortID(top))
	}
	return top, nil
}

// selectDesktops returns the desktops spec names, or those whose head system
// chain holds spec.Using.
func selectDesktops(st *images.Store, spec RecomposeSpec) ([]images.Desktop, error) {
	if (len(spec.Desktops) > 0) == (spec.Using != "") {
		return nil, fmt.Errorf("%w: name the desktops, or select them with --using LAYER (not both)", images.ErrInvalid)
	}
	if spec.Using == "" {
		var out []images.Desktop
		seen := map[string]bool{}
		for _, n := range spec.Desktops {
			if seen[n] {
				continue
			}
			seen[n] = true
			d, err := st.Desktop(n)
			if err != nil {
				return nil, err
			}
			out = append(out, *d)
		}
		return out, nil
	}
	id, err := st.Resolve(spec.Using)
	if err != nil {
		return nil, fmt.Errorf("--using %s: %w", spec.Using, err)
	}
	all, err := st.Desktops()
	if err != nil {
		return nil, err
	}
	var out []images.Desktop
	for _, d := range all {
		h := d.HeadVersion()
		if h == nil {
			continue
		}
		chain, err := st.Chain(h.System)
		if err != nil {
			return nil, fmt.Errorf("desktop %s: %w", d.Name, err)
		}
		for _, l := range chain {
			if l.ID == id {
				out = append(out, d)
				break
			}
		}
	}
	return out, nil
}

func defaultInUse(d *images.Desktop) (bool, error) { return d.Lease != "", nil }

// Recompose moves desktops onto new base and app layers (see RecomposeSpec and
// the policies). For each desktop it reports the conflict set — the clusters
// that changed between the old and new lower layers and that the desktop's own
// delta also holds — and the cost of the move. The lower layers are compared
// through their shared ancestry, once per old lower layer, not once per desktop.
//
// Applying builds each desktop's new chain beside the old one (a new layer for
// its own versions when it has any, a new top) and switches the desktop in one
// store transaction, recorded as a new version. A crash leaves each desktop
// wholly on its old chain or wholly on its new one; sealed layers are only read.
// A desktop in use is not moved: it is marked to switch at its next start
// (ApplySwitch carries the mark out).
func Recompose(ctx context.Context, st *images.Store, spec RecomposeSpec) (*RecomposeReport, error) {
	start := time.Now()
	policy, err := ParsePolicy(string(spec.Policy))
	if err != nil {
		return nil, err
	}
	newLower, err := resolveLower(st, spec.Base, spec.Apps)
	if err != nil {
		return nil, fmt.Errorf("recompose: %w", err)
	}
	desks, err := selectDesktops(st, spec)
	if err != nil {
		return nil, fmt.Errorf("recompose: %w", err)
	}
	nl, err := st.Layer(newLower)
	if err != nil {
		return nil, err
	}
	rep := &RecomposeReport{DryRun: spec.DryRun, Policy: policy, NewLower: newLower, Names: nl.Names, Desktops: []DesktopPlan{}}
	newImg, err := st.OpenLayer(newLower, false)
	if err != nil {
		return nil, fmt.Errorf("recompose: open %s: %w", images.ShortID(newLower), err)
	}
	defer newImg.Close()
	pl := &planner{st: st, newLower: newLower, newImg: newImg, diffs: map[string]*lowerDiff{}, forceMeta: spec.ForceCorruptingMetadata, rules: spec.Rules}
	inUse := spec.InUse
	if inUse == nil {
		inUse = defaultInUse
	}
	workers := spec.Workers
	if workers <= 0 {
		workers = 2
	}

	plans := make([]*DesktopPlan, len(desks))
	errs := make([]error, len(desks))
	run(ctx, len(desks), workers, func(i int) {
		d := &desks[i]
		use, err := inUse(d)
		if err == nil {
			plans[i], err = pl.plan(ctx, d, policy, use)
		}
		errs[i] = err
	})
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	for _, d := range pl.diffs {
		if d.err == nil {
			rep.LowerDiffs++
			rep.LowerDiffRead += d.read
		}
	}
	rep.PlanSeconds = time.Since(start).Seconds()

	if !spec.DryRun {
		applyStart := time.Now()
		run(ctx, len(desks), workers, func(i int) {
			if errs[i] != nil {
				return
			}
			errs[i] = apply(ctx, st, pl, plans[i], policy)
		})
		rep.ApplySeconds = time.Since(applyStart).Seconds()
	}
	for i, p := range plans {
		if p == nil {
			p = &DesktopPlan{Desktop: desks[i].Name, FromHead: desks[i].Head, Conflicts: []overlay.Range{}}
		}
		if errs[i] != nil {
			p.Error = errs[i].Error()
			rep.Failed++
		} else {
			switch p.Action {
			case ActionMove:
				rep.Moved++
			case ActionMerge:
				rep.Merged++
			case ActionRefresh:
				rep.Refreshed++
			case ActionConflict:
				rep.LeftConflicts++
			case ActionMark:
				rep.Marked++
			case ActionNone:
				rep.Unchanged++
			}
			rep.Cost.add(p.Cost)
		}
		rep.Desktops = append(rep.Desktops, *p)
	}
	sort.SliceStable(rep.Desktops, func(i, j int) bool { return rep.Desktops[i].Desktop < rep.Desktops[j].Desktop })
	if err := ctx.Err(); err != nil {
		return rep, err
	}
	if rep.Failed > 0 {
		var names []string
		for _, p := range rep.Desktops {
			if p.Error != "" {
				names = append(names, p.Desktop+": "+p.Error)
			}
		}
		return rep, fmt.Errorf("recompose failed for %d desktops: %s", rep.Failed, strings.Join(names, "; "))
	}
	return rep, nil
}

// run calls fn(0..n-1) on up to workers goroutines, stopping early when ctx ends.
func run(ctx context.Context, n, workers int, fn func(i int)) {
	next := make(chan int)
	var wg sync.WaitGroup
	for range min(workers, max(n, 1)) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range next {
				fn(i)
			}
		}()
	}
	for i := range n {
		if ctx.Err() != nil {
			break
		}
		next <- i
	}
	close(next)
	wg.Wait()
}

// apply carries out a desktop's plan.
func apply(ctx context.Context, st *images.Store, pl *planner, p *DesktopPlan, policy Policy) error {
	switch p.Action {
	case ActionMove, ActionRefresh, ActionMerge:
	case ActionMark:
		if err := markSwitch(st, p, pl.newLower, policy); err != nil {
			return err
		}
		p.Applied = true
		return nil
	default:
		return nil
	}
	d, err := st.Desktop(p.Desktop)
	if err != nil {
		return err
	}
	if d.Head != p.FromHead {
		return fmt.Errorf("desktop %s: its head moved from %d to %d since the plan", d.Name, p.FromHead, d.Head)
	}
	var b *built
	if p.Action == ActionMerge {
		b, err = buildMerge(ctx, st, d, pl.newLower, p)
	} else {
		b, err = build(ctx, st, d, pl.newLower, p.Action == ActionRefresh)
	}
	if err != nil {
		return err
	}
	nd, err := switchDesktop(st, b, d, func(x *images.Desktop) error {
		h := x.HeadVersion()
		if h == nil {
			return fmt.Errorf("no head version")
		}
		n := 0
		for _, v := range x.Versions {
			n = max(n, v.N)
		}
		x.Versions = append(x.Versions, images.Version{N: n + 1, Created: time.Now().UTC().Truncate(time.Second),
			System: b.system, User: h.User, Kind: images.VersionRecompose, Note: "recompose (" + string(policy) + ")"})
		x.Head = n + 1
		return nil
	})
	if err != nil {
		return err
	}
	p.Applied, p.NewVersion, p.NewSystem = true, nd.Head, b.system
	return nil
}
