package syncd

import (
	"fmt"
	"io"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"github.com/cvd-project/cvd/catalog"
)

// metrics are the server's counters, written at /metrics in the Prometheus text
// exposition format (version 0.0.4) by hand: a handful of counters does not need
// a client library.
type metrics struct {
	bytesSent            atomic.Int64
	bytesReceived        atomic.Int64
	clustersSent         atomic.Int64
	clustersReceived     atomic.Int64
	clustersDeduplicated atomic.Int64
	checkouts            atomic.Int64
	authFailures         atomic.Int64
	digestMismatches     atomic.Int64

	mu        sync.Mutex
	requests  map[[2]string]int64 // route, code → count
	checkinsN map[string]int64    // result → count
	durations map[string]*histogram
}

var durationBuckets = []float64{0.005, 0.025, 0.1, 0.5, 1, 5, 30, 120}

type histogram struct {
	counts []int64 // per bucket, cumulative when written
	sum    float64
	n      int64
}

func newMetrics() *metrics {
	return &metrics{requests: map[[2]string]int64{}, checkinsN: map[string]int64{}, durations: map[string]*histogram{}}
}

func (m *metrics) request(route string, code int) {
	m.mu.Lock()
	m.requests[[2]string{route, fmt.Sprint(code)}]++
	m.mu.Unlock()
}

func (m *metrics) observe(route string, d time.Duration) {
	m.mu.Lock()
	defer m.mu.Unlock()
	h := m.durations[route]
	if h == nil {
		h = &histogram{counts: make([]int64, len(durationBuckets))}
		m.durations[route] = h
	}
	sec := d.Seconds()
	for i, b := range durationBuckets {
		if sec <= b {
			h.counts[i]++
		}
	}
	h.sum += sec
	h.n++
}

func (m *metrics) checkins(result string) {
	m.mu.Lock()
	m.checkinsN[result]++
	m.mu.Unlock()
}

func (s *Server) writeMetrics(w io.Writer) {
	m := s.m
	counter := func(name, help string, v int64) {
		fmt.Fprintf(w, "# HELP %s %s\n# TYPE %s counter\n%s %d\n", name, help, name, name, v)
	}
	counter("cvd_sync_sent_bytes_total", "Cluster stream bytes sent to laptops (check-outs).", m.bytesSent.Load())
	counter("cvd_sync_received_bytes_total", "Cluster stream bytes received from laptops (check-ins).", m.bytesReceived.Load())
	counter("cvd_sync_sent_clusters_total", "Cluster entries sent in layer streams.", m.clustersSent.Load())
	counter("cvd_sync_received_clusters_total", "Data clusters received in check-ins.", m.clustersReceived.Load())
	counter("cvd_sync_deduplicated_clusters_total", "Check-in clusters taken from layers the server already held.", m.clustersDeduplicated.Load())
	counter("cvd_sync_checkouts_total", "Leases granted by check-outs.", m.checkouts.Load())
	counter("cvd_sync_auth_failures_total", "Requests refused for a missing or wrong token.", m.authFailures.Load())
	counter("cvd_sync_digest_mismatches_total", "Uploads refused for a cluster that did not match its digest.", m.digestMismatches.Load())

	m.mu.Lock()
	fmt.Fprintf(w, "# HELP cvd_sync_checkins_total Committed check-ins by result.\n# TYPE cvd_sync_checkins_total counter\n")
	for _, k := range sortedKeys(m.checkinsN) {
		fmt.Fprintf(w, "cvd_sync_checkins_total{result=%q} %d\n", k, m.checkinsN[k])
	}
	fmt.Fprintf(w, "# HELP cvd_sync_requests_total API requests by route and status code.\n# TYPE cvd_sync_requests_total counter\n")
	keys := make([][2]string, 0, len(m.requests))
	for k := range m.requests {
		keys = append(keys, k)
	}
	sort.Slice(keys, func(i, j int) bool {
		if keys[i][0] != keys[j][0] {
			return keys[i][0] < keys[j][0]
		}
		return keys[i][1] < keys[j][1]
	})
	for _, k := range keys {
		fmt.Fprintf(w, "cvd_sync_requests_total{route=%q,code=%q} %d\n", k[0], k[1], m.requests[k])
	}
	fmt.Fprintf(w, "# HELP cvd_sync_request_duration_seconds API request durations by route.\n# TYPE cvd_sync_request_duration_seconds histogram\n")
	for _, route := range sortedKeys(m.durations) {
		h := m.durations[route]
		for i, b := range durationBuckets {
			fmt.Fprintf(w, "cvd_sync_request_duration_seconds_bucket{route=%q,le=\"%g\"} %d\n", route, b, h.counts[i])
		}
		fmt.Fprintf(w, "cvd_sync_request_duration_seconds_bucket{route=%q,le=\"+Inf\"} %d\n", route, h.n)
		fmt.Fprintf(w, "cvd_sync_request_duration_seconds_sum{route=%q} %g\n", route, h.sum)
		fmt.Fprintf(w, "cvd_sync_request_duration_seconds_count{route=%q} %d\n", route, h.n)
	}
	m.mu.Unlock()

	var leases, devices int64
	s.st.View(func(tx *catalog.Tx) error {
		tx.Query("SELECT COUNT(*) FROM leases WHERE state = 'active' AND expires > ?", []any{leaseTime(s.now())},
			func(scan func(dest ...any) error) error { return scan(&leases) })
		return tx.Query("SELECT COUNT(*) FROM devices", nil,
			func(scan func(dest ...any) error) error { return scan(&devices) })
	})
	fmt.Fprintf(w, "# HELP cvd_sync_active_leases Unexpired leases.\n# TYPE cvd_sync_active_leases gauge\ncvd_sync_active_leases %d\n", leases)
	fmt.Fprintf(w, "# HELP cvd_sync_devices Registered devices.\n# TYPE cvd_sync_devices gauge\ncvd_sync_devices %d\n", devices)
}

func sortedKeys[V any](m map[string]V) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}
