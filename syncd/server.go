package syncd

import (
	"cmp"
	"context"
	"crypto/cipher"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/cvd-project/cvd/syncd/state"

	"github.com/cvd-project/cvd/catalog"
	"github.com/cvd-project/cvd/images"
	"github.com/cvd-project/cvd/syncd/proto"
)

// VMStopper stops a desktop's server-side VM before the desktop is checked out.
// The CLI wires it to package hypervisor when libvirt is reachable.
type VMStopper interface {
	// StopDesktop shuts the desktop's VM down, gracefully and then forced once
	// timeout has passed. It reports whether a running VM was stopped; a desktop
	// with no VM is not an error.
	StopDesktop(ctx context.Context, desktop string, timeout time.Duration) (stopped bool, err error)
}

// ServerOptions controls a Server.
type ServerOptions struct {
	// LeaseTTL is the lease length when a device asks for none (default 7 days);
	// MaxLeaseTTL caps what a device may ask (default 30 days).
	LeaseTTL, MaxLeaseTTL time.Duration
	// StreamLeaseTTL caps the lease of a copy that still streams in (default 1
	// hour): offline use needs the whole desktop local, so such a lease lasts
	// only as long as the device stays in touch (its agent renews it); the copy
	// pinned and complete gets a full lease at its next renewal.
	StreamLeaseTTL time.Duration
	// VM stops server-side VMs at check-out; nil when there is no hypervisor.
	VM VMStopper
	// StopTimeout is the graceful shutdown time before a forced stop (default 60 s).
	StopTimeout time.Duration
	// BeforeCheckout runs after the server-side VM is stopped and its tops are
	// sealed, before the lease is granted: the desktop's next start is on the
	// laptop. The CLI wires it to overlay.ApplySwitch, which carries out a
	// recompose marked while the desktop was in use. Nil does nothing.
	BeforeCheckout func(ctx context.Context, desktop string) error
	// Logger receives one line per request and per state change; nil discards.
	Logger *slog.Logger
	// Now is the clock (tests set it).
	Now func() time.Time
	// Admin skips the start-up repairs and the background work: the Server is
	// used for the administrator's operations only, beside the serving process.
	Admin bool
	// HeaderTimeout bounds the wait for a request's header (default 10 s),
	// IdleTimeout a keep-alive connection's wait for the next request (default 2
	// min), ProgressTimeout a body or a stream that moves no byte (default 1
	// min); MaxConns caps the connections open at once (default 4096). See
	// HTTPServer and Listen.
	HeaderTimeout, IdleTimeout, ProgressTimeout time.Duration
	MaxConns                                    int
	// MaxOpenCheckins caps the check-ins a device may have open at once (default
	// 8); a check-in still receiving SessionMaxIdle after it was opened (default
	// 24 h) is abandoned: the serving process reaps it every ReapInterval
	// (default 10 min), and its device's rerun starts it again.
	MaxOpenCheckins              int
	SessionMaxIdle, ReapInterval time.Duration
	// MinRoleInterval is how long a device stays active before another device
	// of the desktop's group may ask for the role (default 30 s; negative: no
	// minimum): two devices do not thrash it.
	MinRoleInterval time.Duration
	// EncryptCopies gives every check-out an encrypted copy (a device may ask
	// for one with CheckoutRequest.Encrypt in any case). MasterKeyFile holds the
	// key that seals the escrowed copy keys in the catalog (default
	// <store>/sync/master.key, made on first use; every server of a site needs
	// the same one).
	EncryptCopies bool
	MasterKeyFile string
}

// Server is the data-center side: it serves the HTTP API over a store. It also
// carries the administrator's operations (devices, versions, rollback), which the
// CLI calls directly on the store when no server runs.
type Server struct {
	store *images.Store
	st    *state.State
	// instance names this process among the site's servers (host, PID and a
	// random part): a check-in's record names the last one that worked on it.
	instance string
	opts     ServerOptions
	log      *slog.Logger
	m        *metrics

	// entriesMu makes the layers' entry lists one at a time.
	entriesMu sync.Mutex

	mu       sync.Mutex
	sessions map[string]*session // open check-ins
	haves    map[string]*haveSet // lease → layers its laptop holds
	// fresh holds the staging layers this process created: every cluster in
	// them was checked against its digest before this process wrote it, so
	// their lists can stand in for reading them again at commit. A staging
	// layer left by an earlier process (a crash may have lost writes) is read.
	fresh map[string]bool
	// indexed holds the layers known to be in the cluster index.
	indexed map[string]bool

	masterMu sync.Mutex
	master   cipher.AEAD // seals escrowed keys; loaded on first use

	// failpoint, set by tests, can fail a step by name ("commit:catalog").
	failpoint func(step string) error

	bgIndex   sync.WaitGroup
	closeOnce sync.Once
	cancel    context.CancelFunc
	bgCtx     context.Context
}

// NewServer opens syncd's state in the store and starts indexing the store's
// layers in the background (a check-in waits for it).
func NewServer(store *images.Store, opts ServerOptions) (*Server, error) {
	if opts.LeaseTTL == 0 {
		opts.LeaseTTL = 7 * 24 * time.Hour
	}
	if opts.StreamLeaseTTL == 0 {
		opts.StreamLeaseTTL = time.Hour
	}
	if opts.MaxLeaseTTL == 0 {
		opts.MaxLeaseTTL = 30 * 24 * time.Hour
	}
	if opts.StopTimeout == 0 {
		opts.StopTimeout = 60 * time.Second
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	opts.HeaderTimeout = cmp.Or(opts.HeaderTimeout, defaultHeaderTimeout)
	opts.IdleTimeout = cmp.Or(opts.IdleTimeout, defaultIdleTimeout)
	opts.ProgressTimeout = cmp.Or(opts.ProgressTimeout, defaultProgressTimeout)
	opts.MaxConns = cmp.Or(opts.MaxConns, defaultMaxConns)
	opts.MaxOpenCheckins = cmp.Or(opts.MaxOpenCheckins, 8)
	opts.SessionMaxIdle = cmp.Or(opts.SessionMaxIdle, 24*time.Hour)
	opts.ReapInterval = cmp.Or(opts.ReapInterval, 10*time.Minute)
	opts.MinRoleInterval = cmp.Or(opts.MinRoleInterval, 30*time.Second)
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	st, err := state.Open(store)
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithCancel(context.Background())
	host, _ := os.Hostname()
	s := &Server{store: store, st: st, opts: opts, log: log, instance: fmt.Sprintf("%s/%d/%s", host, os.Getpid(), newLeaseID()[:8]),
		sessions: map[string]*session{}, haves: map[string]*haveSet{}, fresh: map[string]bool{}, indexed: map[string]bool{}, cancel: cancel, bgCtx: ctx}
	s.m = s.newMetrics()
	if !opts.Admin {
		// Only a serving process repairs what an interrupted server left: an
		// administrator's command runs beside a server whose staging files and
		// tops it must not touch.
		if err := s.reconcile(ctx); err != nil {
			st.Close()
			cancel()
			return nil, err
		}
		s.indexLater()
		s.bgIndex.Add(1)
		go func() { // reaps abandoned check-ins while the server runs
			defer s.bgIndex.Done()
			t := time.NewTicker(s.opts.ReapInterval)
			defer t.Stop()
			for {
				select {
				case <-ctx.Done():
					return
				case <-t.C:
					if n, err := s.reapSessions(); err != nil {
						s.log.Warn("reap abandoned check-ins", "err", err)
					} else if n > 0 {
						s.log.Info("reaped abandoned check-ins", "count", n)
					}
				}
			}
		}()
	}
	return s, nil
}

// Close stops background work and closes syncd's state (not the store).
func (s *Server) Close() error {
	var err error
	s.closeOnce.Do(func() {
		s.cancel()
		s.bgIndex.Wait()
		err = s.st.Close()
	})
	return err
}

func (s *Server) now() time.Time { return s.opts.Now() }

// lockDesktop takes the desktop's lock of the site (every server and
// administrator's command on the catalog): check-out, the commit of a check-in,
// rollback, export and breaking a lease run one at a time per desktop.
func (s *Server) lockDesktop(ctx context.Context, name string) (func(), error) {
	return s.st.DB.Lock(ctx, "desktop/"+name, false)
}

// ensureIndexed indexes every layer of the store the cluster index does not cover.
// Indexing runs once at a time across the site (the catalog's lock "index").
// The layers known to be indexed are remembered (a layer once indexed stays
// so): a check-in that finds every layer known takes no lock and asks the
// catalog nothing more than the list of layers; the others are looked up in one
// read, and only layers still not indexed are indexed under the lock.
func (s *Server) ensureIndexed(ctx context.Context) error {
	all, err := s.store.Layers()
	if err != nil {
		return err
	}
	var layers []images.Layer
	s.mu.Lock()
	for _, l := range all {
		if !s.indexed[l.ID] {
			layers = append(layers, l)
		}
	}
	s.mu.Unlock()
	if len(layers) == 0 {
		return nil
	}
	if layers, err = s.notIndexed(layers); err != nil || len(layers) == 0 {
		return err
	}
	release, err := s.st.DB.Lock(ctx, "index", false)
	if err != nil {
		return err
	}
	defer release()
	if layers, err = s.notIndexed(layers); err != nil || len(layers) == 0 {
		return err
	}
	// Parents first: a cluster that a layer repeats from below is found in the
	// lower layer, which more laptops hold.
	parent := map[string]string{}
	for _, l := range layers {
		parent[l.ID] = l.Parent
	}
	depth := func(id string) int {
		n := 0
		for p := parent[id]; p != "" && n < 1000; p = parent[p] {
			n++
		}
		return n
	}
	sort.SliceStable(layers, func(i, j int) bool { return depth(layers[i].ID) < depth(layers[j].ID) })
	for _, l := range layers {
		start := time.Now()
		if err := s.st.IndexLayerFile(ctx, l.ID, s.store.LayerPath(l.ID)); err != nil {
			return err
		}
		s.knowIndexed(l.ID)
		s.log.Info("indexed layer", "layer", state.Short(l.ID), "clusters", l.DataClusters, "took", time.Since(start).Round(time.Millisecond))
	}
	return nil
}

// notIndexed returns the layers of ls the catalog does not record as indexed,
// in one read, and remembers the others.
func (s *Server) notIndexed(ls []images.Layer) ([]images.Layer, error) {
	var out []images.Layer
	err := s.st.View(func(tx *catalog.Tx) error {
		out = out[:0]
		for _, l := range ls {
			if state.IsIndexed(tx, l.ID) {
				s.knowIndexed(l.ID)
			} else {
				out = append(out, l)
			}
		}
		return nil
	})
	return out, err
}

func (s *Server) knowIndexed(ids ...string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, id := range ids {
		s.indexed[id] = true
	}
}

// Handler is the HTTP API: /v1/... and /metrics.
func (s *Server) Handler() http.Handler {
	mux := http.NewServeMux()
	route := func(pattern, name string, h func(w http.ResponseWriter, r *http.Request, dev *Device) error) {
		mux.HandleFunc(pattern, s.wrap(name, h))
	}
	route("GET /v1/desktops/{desktop}", "desktop", s.handleDesktop)
	route("GET /v1/desktops/{desktop}/manifest", "manifest", s.handleManifest)
	route("PUT /v1/desktops/{desktop}/device", "device_report", s.handleDeviceReport)
	route("POST /v1/desktops/{desktop}/open", "open", s.handleOpen)
	route("GET /v1/desktops/{desktop}/boot/{sum}", "boot_file", s.handleBootFile)
	route("PUT /v1/desktops/{desktop}/console", "console", s.handleConsole)
	route("POST /v1/desktops/{desktop}/checkout", "checkout", s.handleCheckout)
	route("POST /v1/desktops/{desktop}/renew", "renew", s.handleRenew)
	route("POST /v1/desktops/{desktop}/release", "release", s.handleRelease)
	route("GET /v1/layers/{id}", "layer", s.handleLayer)
	route("GET /v1/layers/{id}/clusters", "clusters", s.handleClusters)
	route("GET /v1/layers/{id}/entries", "entries_list", s.handleLayerEntries)
	route("POST /v1/layers/{id}/read", "read", s.handleLayerRead)
	route("GET /v1/layers/{id}/workingset", "working_set", s.handleWorkingSet)
	route("PUT /v1/layers/{id}/workingset", "working_set_report", s.handleWorkingSet)
	route("POST /v1/checkins", "checkin", s.handleCheckinOpen)
	route("GET /v1/checkins/{id}", "checkin_status", s.handleCheckinStatus)
	route("PUT /v1/checkins/{id}/entries/{disk}", "entries", s.handleEntries)
	route("GET /v1/checkins/{id}/missing", "missing", s.handleMissing)
	route("POST /v1/checkins/{id}/clusters", "upload", s.handleUpload)
	route("POST /v1/checkins/{id}/commit", "commit", s.handleCommit)
	mux.HandleFunc("GET /v1/health", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, map[string]string{"status": "ok"})
	})
	mux.Handle("GET /metrics", s.m.handler())
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		s.m.request("unknown", http.StatusNotFound)
		writeError(w, fmt.Errorf("%w: no route %s %s", proto.ErrNotFound, r.Method, r.URL.Path))
	})
	return mux
}

// statusWriter remembers the status code written.
type statusWriter struct {
	http.ResponseWriter
	code     int
	progress func() // moves the write deadline on (nil: none)
}

// Unwrap gives http.ResponseController the writer underneath.
func (w *statusWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }

func (w *statusWriter) WriteHeader(code int) {
	if w.code == 0 {
		w.code = code
	}
	w.ResponseWriter.WriteHeader(code)
}

func (w *statusWriter) Write(b []byte) (int, error) {
	if w.code == 0 {
		w.code = http.StatusOK
	}
	if w.progress != nil {
		w.progress()
	}
	return w.ResponseWriter.Write(b)
}

func (w *statusWriter) Flush() {
	if f, ok := w.ResponseWriter.(http.Flusher); ok {
		f.Flush()
	}
}

// wrap authenticates the device token and turns errors into JSON error bodies.
func (s *Server) wrap(name string, h func(w http.ResponseWriter, r *http.Request, dev *Device) error) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		start := time.Now()
		sw := &statusWriter{ResponseWriter: w}
		// Progress deadlines: a body that stops arriving, or a client that stops
		// reading a stream, ends the request once ProgressTimeout passes without
		// a byte moving. The write deadline goes when the request ends (the
		// server's idle timeout takes over the connection).
		if d := s.opts.ProgressTimeout; d > 0 {
			rc := http.NewResponseController(w)
			if rc.SetReadDeadline(time.Now().Add(d)) == nil {
				r.Body = &progressReader{r: r.Body, rc: rc, d: d}
			}
			if rc.SetWriteDeadline(time.Now().Add(d)) == nil {
				sw.progress = func() { rc.SetWriteDeadline(time.Now().Add(d)) }
				defer rc.SetWriteDeadline(time.Time{})
			}
		}
		err := func() error {
			tok, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
			if !ok {
				return fmt.Errorf("%w: no bearer token", proto.ErrUnauthorized)
			}
			dev, err := authenticate(s.st, strings.TrimSpace(tok))
			if err != nil {
				s.m.authFailures.Add(float64(1))
				return err
			}
			return h(sw, r, dev)
		}()
		if err != nil {
			err = proto.NoSpace(err)
			var mbe *http.MaxBytesError
			if errors.As(err, &mbe) {
				err = proto.BadRequest("request body over %d bytes", mbe.Limit)
			}
			code, _ := proto.CodeOf(err)
			if code == "internal" {
				s.log.Error("request failed", "route", name, "path", r.URL.Path, "err", err)
			} else {
				s.log.Info("request refused", "route", name, "path", r.URL.Path, "err", err)
			}
			if sw.code == 0 {
				writeError(sw, err)
			}
		}
		if sw.code == 0 {
			sw.WriteHeader(http.StatusNoContent)
		}
		s.m.request(name, sw.code)
		s.m.observe(name, time.Since(start))
	}
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	enc.Encode(v)
}

// maxErrorText bounds an error body's message: a message that quotes a client's
// input (a name, an ID, a content type) never echoes a large one back.
const maxErrorText = 512

func writeError(w http.ResponseWriter, err error) {
	code, status := proto.CodeOf(err)
	msg := err.Error()
	if len(msg) > maxErrorText {
		msg = strings.ToValidUTF8(msg[:maxErrorText], "") + "… (truncated)"
	}
	body := proto.ErrorBody{Error: msg, Code: code, Status: status}
	var le *proto.LeaseError
	if errors.As(err, &le) {
		body.Lease = le
	}
	writeJSON(w, status, body)
}

func readJSON(w http.ResponseWriter, r *http.Request, v any) error {
	if ct := r.Header.Get("Content-Type"); ct != "" && !strings.HasPrefix(ct, "application/json") {
		return proto.BadRequest("content type %q, want application/json", ct)
	}
	dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, proto.MaxJSON))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return proto.BadRequest("request body: %v", err)
	}
	if dec.More() {
		return proto.BadRequest("request body: trailing data")
	}
	return nil
}

// desktopFor checks that dev may use the desktop named in the path.
func (s *Server) desktopFor(r *http.Request, dev *Device) (string, error) {
	name := r.PathValue("desktop")
	if err := images.CheckObjectName("desktop", name); err != nil {
		return "", proto.BadRequest("%v", err)
	}
	if !dev.Bound(name) && !dev.Host() {
		return "", fmt.Errorf("%w: device %s, desktop %s", proto.ErrForbidden, dev.Name, name)
	}
	return name, nil
}

// leaseDesktopFor is desktopFor for the calls that take, renew or release a
// lease, which a host holds only for a desktop whose device group it is in
// (the data-center device, when the desktop runs there).
func (s *Server) leaseDesktopFor(r *http.Request, dev *Device) (string, error) {
	name, err := s.desktopFor(r, dev)
	if err == nil && dev.Host() && !dev.Bound(name) {
		return "", fmt.Errorf("%w: %s is a host outside the device group of %s: it pulls sealed layers and takes no lease", proto.ErrForbidden, dev.Name, name)
	}
	return name, err
}

func (s *Server) handleDesktop(w http.ResponseWriter, r *http.Request, dev *Device) error {
	name, err := s.desktopFor(r, dev)
	if err != nil {
		return err
	}
	st, err := s.DesktopStatus(name)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, st)
	return nil
}

// DesktopStatus is a desktop's versions and lease.
func (s *Server) DesktopStatus(name string) (*proto.DesktopStatus, error) {
	dv, err := desktopVersions(s.store, name)
	if err != nil {
		return nil, err
	}
	out := &proto.DesktopStatus{Name: name, Head: dv.Head, Versions: dv.Versions}
	err = s.st.View(func(tx *catalog.Tx) error {
		if out.Lease, err = activeLease(tx, name); err != nil {
			return err
		}
		var r proto.RemoteOpen
		if ok, err := state.GetJSON(tx, state.BucketRemote, name, &r); err != nil || !ok {
			return err
		}
		out.Remote = &r
		return nil
	})
	return out, err
}

// syncPath is a path under <store>/sync.
func (s *Server) syncPath(elem ...string) string {
	return filepath.Join(append([]string{s.st.Dir}, elem...)...)
}

func removeAllQuiet(p string) { os.RemoveAll(p) }
