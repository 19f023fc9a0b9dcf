package syncd

import (
	"net/http"
	"strconv"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/cvd-project/cvd/catalog"
)

// metrics are the server's instruments, in a registry of its own (so that two
// servers in one process, as in tests, count apart) with the Go runtime's and the
// process's, served at /metrics by the Prometheus client library.
type metrics struct {
	reg *prometheus.Registry

	bytesSent            prometheus.Counter
	bytesReceived        prometheus.Counter
	clustersSent         prometheus.Counter
	clustersReceived     prometheus.Counter
	clustersDeduplicated prometheus.Counter
	clustersCommitted    prometheus.Counter
	checkouts            prometheus.Counter
	pulls                prometheus.Counter
	authFailures         prometheus.Counter
	digestMismatches     prometheus.Counter
	checkinsTotal        *prometheus.CounterVec   // by result
	requests             *prometheus.CounterVec   // by route and code
	durations            *prometheus.HistogramVec // by route

	// The dedup ratio's parts since the process started: data clusters of
	// committed check-ins, and those of them taken from the store.
	committed, deduplicated atomic.Int64
}

// committedCheckin counts a committed check-in's data clusters and those of
// them the store already held.
func (m *metrics) committedCheckin(clusters, deduplicated int64) {
	m.clustersCommitted.Add(float64(clusters))
	m.clustersDeduplicated.Add(float64(deduplicated))
	m.committed.Add(clusters)
	m.deduplicated.Add(deduplicated)
}

var durationBuckets = []float64{0.005, 0.025, 0.1, 0.5, 1, 5, 30, 120}

// newMetrics makes the server's instruments; the gauges of leases and devices
// are read from the catalog at each scrape.
func (s *Server) newMetrics() *metrics {
	m := &metrics{reg: prometheus.NewRegistry()}
	m.reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	counter := func(name, help string) prometheus.Counter {
		c := prometheus.NewCounter(prometheus.CounterOpts{Name: name, Help: help})
		m.reg.MustRegister(c)
		return c
	}
	m.bytesSent = counter("cvd_sync_sent_bytes_total", "Cluster stream bytes sent to laptops (check-outs).")
	m.bytesReceived = counter("cvd_sync_received_bytes_total", "Cluster stream bytes received from laptops (check-ins).")
	m.clustersSent = counter("cvd_sync_sent_clusters_total", "Cluster entries sent in layer streams.")
	m.clustersReceived = counter("cvd_sync_received_clusters_total", "Data clusters received in check-ins.")
	m.clustersDeduplicated = counter("cvd_sync_deduplicated_clusters_total", "Check-in clusters taken from layers the server already held.")
	m.clustersCommitted = counter("cvd_sync_committed_clusters_total", "Data clusters of committed check-ins.")
	m.checkouts = counter("cvd_sync_checkouts_total", "Leases granted by check-outs.")
	m.pulls = counter("cvd_sync_pulls_total", "Manifests served without a lease (hosts pulling a desktop's layers).")
	m.authFailures = counter("cvd_sync_auth_failures_total", "Requests refused for a missing or wrong token.")
	m.digestMismatches = counter("cvd_sync_digest_mismatches_total", "Uploads refused for a cluster that did not match its digest.")
	m.checkinsTotal = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "cvd_sync_checkins_total",
		Help: "Committed check-ins by result."}, []string{"result"})
	m.requests = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "cvd_sync_requests_total",
		Help: "API requests by route and status code."}, []string{"route", "code"})
	m.durations = prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: "cvd_sync_request_duration_seconds",
		Help: "API request durations by route.", Buckets: durationBuckets}, []string{"route"})
	count := func(query string, args ...any) float64 {
		var n int64
		s.st.View(func(tx *catalog.Tx) error {
			return tx.Query(query, args, func(scan func(dest ...any) error) error { return scan(&n) })
		})
		return float64(n)
	}
	m.reg.MustRegister(m.checkinsTotal, m.requests, m.durations,
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "cvd_sync_active_leases", Help: "Unexpired leases."},
			func() float64 {
				return count("SELECT COUNT(*) FROM leases WHERE state = 'active' AND expires > ?", leaseTime(s.now()))
			}),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "cvd_sync_devices", Help: "Registered devices."},
			func() float64 { return count("SELECT COUNT(*) FROM devices") }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "cvd_sync_dedup_ratio",
			Help: "Share of the data clusters of check-ins committed by this process that the store already held (0 to 1)."},
			func() float64 {
				if n := m.committed.Load(); n > 0 {
					return float64(m.deduplicated.Load()) / float64(n)
				}
				return 0
			}))
	return m
}

func (m *metrics) request(route string, code int) {
	m.requests.WithLabelValues(route, strconv.Itoa(code)).Inc()
}

func (m *metrics) observe(route string, d time.Duration) {
	m.durations.WithLabelValues(route).Observe(d.Seconds())
}

func (m *metrics) checkins(result string) { m.checkinsTotal.WithLabelValues(result).Inc() }

// handler serves the registry in the Prometheus exposition format.
func (m *metrics) handler() http.Handler {
	return promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{Registry: m.reg})
}
