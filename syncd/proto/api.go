package proto

import (
	"time"

	"github.com/cvd-project/cvd/images"
)

// The JSON bodies of the HTTP API (see README.md, "Sync API"). Binary bodies (entry
// lists, missing lists, cluster streams) are described where they are encoded.

// APIVersion prefixes every path.
const APIVersion = "/v1"

// Disk names: a desktop has a system disk and may have a user disk. In binary
// bodies a disk is its number.
const (
	DiskSystem = "system"
	DiskUser   = "user"
)

var DiskNames = []string{DiskSystem, DiskUser}

func DiskNumber(name string) (byte, bool) {
	for i, n := range DiskNames {
		if n == name {
			return byte(i), true
		}
	}
	return 0, false
}

// LayerInfo describes a sealed layer.
type LayerInfo struct {
	ID          string `json:"id"`
	Parent      string `json:"parent,omitempty"`
	Kind        string `json:"kind"`
	Size        int64  `json:"size"`
	ClusterSize int    `json:"cluster_size"`
	images.LayerStats
}

func LayerInfoOf(l *images.Layer) LayerInfo {
	return LayerInfo{ID: l.ID, Parent: l.Parent, Kind: string(l.Kind), Size: l.Size, ClusterSize: l.ClusterSize, LayerStats: l.LayerStats}
}

// DiskManifest is one disk of a checked-out version.
type DiskManifest struct {
	Name string `json:"name"`
	// Layers is the disk's chain, top first; empty for a blank disk.
	Layers []LayerInfo `json:"layers"`
	// BlankSize is the virtual size of a blank disk (no layers).
	BlankSize int64 `json:"blank_size,omitempty"`
}

// Top is the layer the disk's writable top stands on ("" for a blank disk).
func (d *DiskManifest) Top() string {
	if len(d.Layers) == 0 {
		return ""
	}
	return d.Layers[0].ID
}

// Manifest is what a check-out answers: the lease and the version's disks.
type Manifest struct {
	Desktop string         `json:"desktop"`
	Version int            `json:"version"`
	Lease   Lease          `json:"lease"`
	Disks   []DiskManifest `json:"disks"`
	// Policy is the asking device's policy in the desktop's group (the disks
	// are those it holds); Variant, under the apps policy, the base variant
	// its system disk was recomposed onto.
	Policy  string        `json:"policy,omitempty"`
	Variant *VariantChain `json:"variant,omitempty"`
	// Boot is how the desktop boots on every device; its files come from GET
	// /v1/desktops/{d}/boot/{sha256}.
	Boot *images.DesktopBoot `json:"boot,omitempty"`
	// Sealed is the version the check-out sealed from the server's tops (0: none).
	Sealed int `json:"sealed,omitempty"`
	// VMStopped says a running server-side VM was shut down for the check-out.
	VMStopped bool `json:"vm_stopped,omitempty"`
	// Key is the encrypted copy's key, when the check-out asked for one or the
	// server encrypts every copy.
	Key *LeaseKey `json:"key,omitempty"`
}

// LeaseKey is what a device gets to encrypt its copy of a desktop: KEK, the
// passphrase of every LUKS layer it writes (escrowed by the server, the same
// for the device and desktop across leases), and Wrap, fresh material for
// this lease from which the device derives the key that wraps KEK at rest,
// bound to the lease's ID and expiry.
type LeaseKey struct {
	KEK  string `json:"kek"`  // 64 hex digits
	Wrap string `json:"wrap"` // 64 hex digits
}

// VariantChain says onto which base variant a device's system disk was
// recomposed, and what that cost.
type VariantChain struct {
	Class string `json:"class"`
	Base  string `json:"base"`  // the common base it replaces
	Layer string `json:"layer"` // the variant
	// Made is how many layers this manifest made (0 once they exist);
	// ConflictClusters counts the clusters the variant and the desktop's
	// layers both write (the desktop's win).
	Made             int   `json:"made"`
	ConflictClusters int64 `json:"conflict_clusters"`
}

// OpenRequest is the body of POST /v1/desktops/{d}/open: a device asks for
// the desktop's active role. While another device holds it, the holder is
// asked to sync up and step down; after WaitSeconds its lease is broken (its
// later check-in is kept as a conflict version).
type OpenRequest struct {
	WaitSeconds int64 `json:"wait_seconds"`
	// Force skips the minimum interval between two changes of the role.
	Force bool `json:"force,omitempty"`
	// Check only checks that the device may ask now: nothing is recorded.
	Check bool `json:"check,omitempty"`
	// On names another device of the desktop's group (the data-center host)
	// that is to become active and run the desktop, instead of the asker:
	// the request is recorded (DesktopStatus.Remote) for that device's agent.
	On string `json:"on,omitempty"`
	// Remote asks the same of the group's data-center host (its one bound
	// host device) without naming it.
	Remote bool `json:"remote,omitempty"`
}

// RemoteOpen is a request that a device of the group (the data-center host)
// open the desktop and run it; Console is its console address once it runs.
type RemoteOpen struct {
	Device      string    `json:"device"`
	DeviceID    string    `json:"device_id"`
	By          string    `json:"by"` // the device that asked
	Requested   time.Time `json:"requested"`
	WaitSeconds int64     `json:"wait_seconds"`
	Console     string    `json:"console,omitempty"`
	Opened      time.Time `json:"opened,omitzero"`
	Error       string    `json:"error,omitempty"`
}

// ConsoleReport is the body of PUT /v1/desktops/{d}/console: the device that
// was asked to run the desktop says where its console is (or why it could not).
type ConsoleReport struct {
	Console string `json:"console,omitempty"`
	Error   string `json:"error,omitempty"`
}

// OpenAnswer says whether the role is free to take (with a check-out) or
// held: State "free" or "waiting".
type OpenAnswer struct {
	State  string `json:"state"`
	Holder string `json:"holder,omitempty"` // the active device
	// Deadline is when the holder's lease is broken if it has not stepped
	// down; Broken says this answer broke it.
	Deadline time.Time `json:"deadline,omitzero"`
	Broken   bool      `json:"broken,omitempty"`
}

// DeviceReport is the body of PUT /v1/desktops/{d}/device: what a device runs
// and has staged (version numbers, 0 for none).
type DeviceReport struct {
	Runs   int `json:"runs"`
	Staged int `json:"staged"`
	// Fetched is the stream bytes this device's last update received (-1:
	// unchanged since its last report).
	Fetched int64 `json:"fetched"`
	// Class is the hardware class the device detected from its hypervisor:
	// it becomes the device's class when it was registered without one.
	Class string `json:"class,omitempty"`
}

// CheckoutRequest is the body of POST /v1/desktops/{d}/checkout.
type CheckoutRequest struct {
	// TTLSeconds asks for a lease length; 0 means the server's default. The server
	// caps it at its maximum.
	TTLSeconds int64 `json:"ttl_seconds,omitempty"`
	// Have lists layers the laptop holds: a layer stream asked for with this
	// lease sends the clusters they hold as references (R frames).
	Have []string `json:"have,omitempty"`
	// Stream says the copy streams in: it is not fit for offline use until
	// every layer is local, so its lease is an online one (see ServerOptions).
	Stream bool `json:"stream,omitempty"`
	// Encrypt asks for an encrypted copy: the manifest carries its key.
	Encrypt bool `json:"encrypt,omitempty"`
}

// LeaseRequest is the body of renew and release.
type LeaseRequest struct {
	Lease      string `json:"lease"`
	TTLSeconds int64  `json:"ttl_seconds,omitempty"`
	// Stream says the copy still streams in (CheckoutRequest.Stream).
	Stream bool `json:"stream,omitempty"`
}

// DesktopStatus answers GET /v1/desktops/{d}.
type DesktopStatus struct {
	Name     string    `json:"name"`
	Head     int       `json:"head"`
	Versions []Version `json:"versions"`
	Lease    *Lease    `json:"lease,omitempty"`
	// Remote is the latest request that a device run the desktop.
	Remote *RemoteOpen `json:"remote,omitempty"`
}

// CheckinDisk declares one disk's changes in a check-in.
type CheckinDisk struct {
	Name        string `json:"name"`
	Parent      string `json:"parent,omitempty"` // the layer the laptop's top stands on
	Size        int64  `json:"size"`
	ClusterSize int    `json:"cluster_size"`
	Entries     int64  `json:"entries"`      // clusters the top allocates
	DataEntries int64  `json:"data_entries"` // of those, data (not zero)
	// ExpectID is the ID of the layer the entries make (the hash of the list).
	ExpectID string `json:"expect_id"`
}

// Policies of a device in a desktop's device group: which layers it holds.
const (
	PolicyFull = "full" // the system disk (base, apps, versions) and the user disk
	PolicyApps = "apps" // the base variant of its hardware class, the desktop's apps and versions recomposed onto it, the user disk
	PolicyUser = "user" // the user disk only
)

// CheckPolicy accepts a policy name ("" means the default).
func CheckPolicy(p string) error {
	switch p {
	case "", PolicyFull, PolicyApps, PolicyUser:
		return nil
	}
	return BadRequest("policy %q: want full, apps or user", p)
}

// CheckinRequest opens (or resumes) a check-in: POST /v1/checkins.
type CheckinRequest struct {
	ID      string        `json:"id"` // chosen by the laptop: a hash of what it checks in
	Desktop string        `json:"desktop"`
	Lease   string        `json:"lease"`
	Base    int           `json:"base"` // the version the laptop's tops stand on
	Disks   []CheckinDisk `json:"disks"`
	Release bool          `json:"release,omitempty"`
	// A check-in without a lease (Lease "") comes from a device of the
	// desktop's group that is not active: it may change the user disk only,
	// unless it is a Snapshot (the device's state as it becomes active, kept
	// beside the head as a version for rollback).
	Snapshot bool `json:"snapshot,omitempty"`
}

// CheckinStatus answers POST /v1/checkins and GET /v1/checkins/{id}.
type CheckinStatus struct {
	ID        string         `json:"id"`
	State     string         `json:"state"` // receiving, committed
	Lists     []string       `json:"lists"` // disks whose entry lists the server holds
	Missing   int64          `json:"missing"`
	Received  int64          `json:"received_bytes"`
	Committed *CheckinResult `json:"result,omitempty"`
}

// CheckinResult answers the commit.
type CheckinResult struct {
	Desktop  string            `json:"desktop"`
	Version  int               `json:"version"`
	Head     int               `json:"head"`
	Conflict bool              `json:"conflict,omitempty"`
	Layers   map[string]string `json:"layers"` // disk → layer of the new version
	// Bytes is the cluster payload the server received for this check-in (all
	// rounds); Deduplicated counts clusters it already held.
	Bytes        int64     `json:"bytes"`
	Clusters     int64     `json:"clusters"`
	Deduplicated int64     `json:"deduplicated"`
	Released     bool      `json:"released,omitempty"`
	Committed    time.Time `json:"committed"`
	// ServerSealed is a version made first from server-side changes found on the
	// server's tops (they made this check-in a conflict).
	ServerSealed int `json:"server_sealed,omitempty"`
	// Merge is set when the check-in was a conflict on the user disk that the
	// server merged by files with the head (the seed's Table 1): the merged
	// version is the new head.
	Merge *MergeResult `json:"merge,omitempty"`
}

// MergeResult is a file-level merge of a check-in's user disk with the head's.
type MergeResult struct {
	Version int `json:"version"` // the merged version (the new head)
	// Resolutions: how each path either side changed was settled.
	Resolutions []MergeResolution `json:"resolutions"`
	Fsck        []string          `json:"fsck"` // e2fsck's verdict per file system
}

// MergeResolution is how one path was settled: Case and Action are the
// table's words; Copy names a kept conflicted copy.
type MergeResolution struct {
	Path   string `json:"path"`
	Case   string `json:"case"`
	Action string `json:"action"`
	Copy   string `json:"copy,omitempty"`
}

// UploadResult answers POST /v1/checkins/{id}/clusters.
type UploadResult struct {
	Clusters int64 `json:"clusters"`
	Bytes    int64 `json:"bytes"`
}

// ErrorBody is every error's JSON body.
type ErrorBody struct {
	Error  string      `json:"error"`
	Code   string      `json:"code"`
	Lease  *LeaseError `json:"lease,omitempty"`
	Status int         `json:"status"`
}

// Lease is a device's hold on a desktop: while it is active and not expired, no
// other device can check the desktop out. The laptop purges its copy once Expires
// has passed, whether or not it can reach the server.
type Lease struct {
	ID         string    `json:"id"`
	Desktop    string    `json:"desktop"`
	Device     string    `json:"device"` // device ID
	DeviceName string    `json:"device_name"`
	Granted    time.Time `json:"granted"`
	Expires    time.Time `json:"expires"`
	Version    int       `json:"version"` // the version checked out
	// Epoch numbers the desktop's leases (1, 2, ...): the fencing token. A
	// check-in is taken only under the active lease it started with.
	Epoch int64 `json:"epoch"`
	// State is set in the lease log: active, released, broken (by an administrator
	// or a removed device), expired (ended past its expiry).
	State string    `json:"state,omitempty"`
	Ended time.Time `json:"ended,omitzero"`
	// HandoverTo names the device that asked for the active role while this
	// lease is held (HandoverAt when): the holder syncs up and steps down.
	HandoverTo string    `json:"handover_to,omitempty"`
	HandoverAt time.Time `json:"handover_at,omitzero"`
}

// Expired reports whether the lease is past its expiry at now.
func (l *Lease) Expired(now time.Time) bool { return !now.Before(l.Expires) }

// Version is one state of a desktop: the sealed layers its disks stand on. The
// desktop's versions and head live in the images catalog; sync adds check-out
// seals, check-ins (Note "check-in <id>", or "conflict <id>" beside the head),
// rollbacks and imports through images.Store.UpdateDesktop.
type Version = images.Version

// NeedsParent reports whether fetching the layer needs its parent in the store.
func (li *LayerInfo) NeedsParent() bool { return li.Parent != "" && li.Clusters > li.DataClusters }

// States of a check-in (CheckinStatus.State).
const (
	SessionReceiving = "receiving"
	SessionCommitted = "committed"
)

// Limits both sides hold to.
const (
	// MaxHave bounds the layers a check-out may say the laptop holds.
	MaxHave = 100000
	// MaxRead bounds the clusters one read request (POST /v1/layers/{id}/read)
	// may name.
	MaxRead = 1024
	// MaxWorkingSet bounds the clusters a layer's working set lists.
	MaxWorkingSet = 1 << 18
	// MaxJSON bounds a JSON body (a request's, or a bundle's header).
	MaxJSON = 1 << 20
)

// Validate checks what a layer's description promises against itself: its IDs,
// a cluster size of a power of two up to MaxClusterSize, a size with the
// clusters it declares, and data counts within them. A receiver writes no more
// than it declares (the cluster stream is checked against it).
func (li *LayerInfo) Validate() error {
	switch {
	case !LayerIDRE.MatchString(li.ID) || (li.Parent != "" && !LayerIDRE.MatchString(li.Parent)):
		return BadRequest("layer id %.80q, parent %.80q", li.ID, li.Parent)
	case li.ClusterSize < 512 || li.ClusterSize > MaxClusterSize || li.ClusterSize&(li.ClusterSize-1) != 0:
		return BadRequest("layer %s: cluster size %d", li.ID[:12], li.ClusterSize)
	case li.Size <= 0 || li.Size > 1<<50:
		return BadRequest("layer %s: size %d", li.ID[:12], li.Size)
	}
	clusters := (li.Size + int64(li.ClusterSize) - 1) / int64(li.ClusterSize)
	switch {
	case li.Clusters < 0 || li.Clusters > clusters:
		return BadRequest("layer %s: %d clusters listed in %d", li.ID[:12], li.Clusters, clusters)
	case li.DataClusters < 0 || li.DataClusters > li.Clusters:
		return BadRequest("layer %s: %d data clusters of %d", li.ID[:12], li.DataClusters, li.Clusters)
	case li.DataBytes < 0 || li.DataBytes > li.DataClusters*int64(li.ClusterSize):
		return BadRequest("layer %s: %d data bytes in %d clusters", li.ID[:12], li.DataBytes, li.DataClusters)
	}
	return nil
}

// WorkingSet is what devices read of a layer while a desktop on it booted, in
// the order first read (GET and PUT /v1/layers/{id}/workingset): a streaming
// check-out fetches these clusters first. A PUT adds clusters to the set.
type WorkingSet struct {
	Clusters []int64 `json:"clusters"`
	Devices  int     `json:"devices,omitempty"` // how many reports were merged
}
