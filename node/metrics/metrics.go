// Package metrics holds the driver's Prometheus metrics: pulls and their
// results, cache lookups, bytes downloaded, pull and publish durations, and
// gauges of the store read from disk at scrape time and of the config
// file's state.
//
// It owns: the metric names, help texts and labels, registered in the
// registry it is given (no global registry).
//
// It must not: label by volume, image or digest (unbounded series), or
// change what it measures: the store's gauges only read.
package metrics

import (
	"errors"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/wasm-csi/wasm-csi/node/store"
	"github.com/wasm-csi/wasm-csi/puller/errdefs"
)

// Metrics are the driver's Prometheus metrics. None has a per-volume or
// per-digest label. A nil *Metrics records nothing.
type Metrics struct {
	pulls          *prometheus.CounterVec
	cache          *prometheus.CounterVec
	downloaded     prometheus.Counter
	pullDuration   prometheus.Histogram
	publishLatency *prometheus.HistogramVec
	storeMax       prometheus.Gauge
	config         *prometheus.GaugeVec
	verifications  *prometheus.CounterVec
}

// New registers the metrics in reg, including gauges read from the
// store on each scrape (modules and bytes stored, volumes published).
func New(reg prometheus.Registerer, st *store.Store) (*Metrics, error) {
	m := &Metrics{
		pulls: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Name: "pulls_total",
			Help: "Module pulls from a registry, by result.",
		}, []string{"result"}),
		cache: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Name: "cache_lookups_total",
			Help: "Publishes that found their module on the node (hit) or had to pull it (miss).",
		}, []string{"result"}),
		downloaded: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: namespace, Name: "downloaded_bytes_total",
			Help: "Bytes of modules downloaded and stored.",
		}),
		pullDuration: prometheus.NewHistogram(prometheus.HistogramOpts{
			Namespace: namespace, Name: "pull_duration_seconds",
			Help:    "Time to resolve, download, verify and store a module.",
			Buckets: prometheus.ExponentialBuckets(0.01, 2.5, 10),
		}),
		publishLatency: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: namespace, Name: "publish_duration_seconds",
			Help:    "NodePublishVolume duration, by result.",
			Buckets: prometheus.ExponentialBuckets(0.0005, 3, 12),
		}, []string{"result"}),
		verifications: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Name: "verifications_total",
			Help: "Signature checks of modules, by result: verified, cached (passed this policy before: no check), refused, warned (served in warn mode), unavailable (the registry could not be asked).",
		}, []string{"result"}),
		storeMax: prometheus.NewGauge(prometheus.GaugeOpts{
			Namespace: namespace, Name: "store_max_bytes",
			Help: "limits.maxStoreSize in bytes (0: no cap), for the store's use of its cap.",
		}),
		config: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Namespace: namespace, Name: "config_state",
			Help: "1 for the config file's state: ok (in force), last_good (refused; the last good config stays), refused (refused at start: nothing is served).",
		}, []string{"state"}),
	}
	m.ConfigState(ConfigOK)
	// Every label value exported from the start, at zero: a rate() or an
	// alert on a failure the node has not had yet then sees a 0, not nothing.
	for _, l := range []struct {
		vec    *prometheus.MetricVec
		values []string
	}{
		{m.pulls.MetricVec, pullResults},
		{m.verifications.MetricVec, VerificationResults},
		{m.cache.MetricVec, cacheResults},
		{m.publishLatency.MetricVec, publishResults},
	} {
		for _, v := range l.values {
			if _, err := l.vec.GetMetricWithLabelValues(v); err != nil {
				return nil, err
			}
		}
	}
	cs := []prometheus.Collector{m.pulls, m.cache, m.downloaded, m.pullDuration, m.publishLatency, m.storeMax, m.config, m.verifications, newStoreCollector(st)}
	for _, c := range cs {
		if err := reg.Register(c); err != nil {
			return nil, err
		}
	}
	return m, nil
}

// namespace prefixes every metric name.
const namespace = "wasmcsi"

// pullResults are the values PullResult returns.
var pullResults = []string{"success", "not_found", "unauthorized", "unavailable", "invalid_image", "not_verified", "no_space", "error"}

// The result label's values of cache_lookups_total and publish_duration_seconds.
const (
	cacheHit, cacheMiss          = "hit", "miss"
	publishSuccess, publishError = "success", "error"
)

var (
	cacheResults   = []string{cacheHit, cacheMiss}
	publishResults = []string{publishSuccess, publishError}
)

// VerificationResults are the values of verifications_total's result.
var VerificationResults = []string{"verified", "cached", "refused", "warned", "unavailable"}

// Verification records one signature check by result (one of
// VerificationResults).
func (m *Metrics) Verification(result string) {
	if m == nil {
		return
	}
	m.verifications.WithLabelValues(result).Inc()
}

// PullResult names the outcome of a pull for the pulls_total label.
func PullResult(err error) string {
	switch {
	case err == nil:
		return "success"
	case errors.Is(err, errdefs.ErrNotFound):
		return "not_found"
	case errors.Is(err, errdefs.ErrUnauthorized):
		return "unauthorized"
	case errors.Is(err, errdefs.ErrUnavailable):
		return "unavailable"
	case errors.Is(err, errdefs.ErrUnsupportedImage), errors.Is(err, errdefs.ErrInvalidModule), errors.Is(err, errdefs.ErrTooLarge):
		return "invalid_image"
	case errors.Is(err, errdefs.ErrNotVerified):
		return "not_verified"
	case errors.Is(err, errdefs.ErrNoSpace):
		return "no_space"
	}
	return "error"
}

// Config states, as the config_state gauge names them.
const (
	// ConfigOK: the config file on disk is in force (or there is none).
	ConfigOK = "ok"
	// ConfigLastGood: the file was refused; the last good config stays.
	ConfigLastGood = "last_good"
	// ConfigRefused: the file was refused before any was applied: nothing
	// is served until it is fixed.
	ConfigRefused = "refused"
)

// ConfigState sets the config_state gauge: 1 for state, 0 for the others.
func (m *Metrics) ConfigState(state string) {
	if m == nil {
		return
	}
	for _, st := range []string{ConfigOK, ConfigLastGood, ConfigRefused} {
		v := 0.0
		if st == state {
			v = 1
		}
		m.config.WithLabelValues(st).Set(v)
	}
}

// Pulled records a pull from a registry: its result, and for a success its
// bytes and duration.
func (m *Metrics) Pulled(err error, bytes int64, d time.Duration) {
	if m == nil {
		return
	}
	m.pulls.WithLabelValues(PullResult(err)).Inc()
	if err == nil {
		m.downloaded.Add(float64(bytes))
		m.pullDuration.Observe(d.Seconds())
	}
}

// StoreCap records the store's size cap (limits.maxStoreSize; 0: none).
func (m *Metrics) StoreCap(bytes int64) {
	if m == nil {
		return
	}
	m.storeMax.Set(float64(bytes))
}

// CacheLookup records whether a publish found its module on the node.
func (m *Metrics) CacheLookup(hit bool) {
	if m == nil {
		return
	}
	if hit {
		m.cache.WithLabelValues(cacheHit).Inc()
	} else {
		m.cache.WithLabelValues(cacheMiss).Inc()
	}
}

// Published records a publish's duration and whether it failed.
func (m *Metrics) Published(err error, d time.Duration) {
	if m == nil {
		return
	}
	result := publishSuccess
	if err != nil {
		result = publishError
	}
	m.publishLatency.WithLabelValues(result).Observe(d.Seconds())
}

// storeCollector reads the store's size and the published volumes from
// disk at scrape time, so the numbers are right after a restart too.
type storeCollector struct {
	store                   *store.Store
	modules, bytes, volumes *prometheus.Desc
}

func newStoreCollector(st *store.Store) *storeCollector {
	return &storeCollector{
		store:   st,
		modules: prometheus.NewDesc(namespace+"_store_modules", "Modules in the node's store.", nil, nil),
		bytes:   prometheus.NewDesc(namespace+"_store_bytes", "Bytes of modules in the node's store.", nil, nil),
		volumes: prometheus.NewDesc(namespace+"_volumes_published", "Volumes published on this node.", nil, nil),
	}
}

func (c *storeCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- c.modules
	ch <- c.bytes
	ch <- c.volumes
}

func (c *storeCollector) Collect(ch chan<- prometheus.Metric) {
	n, size := c.store.Usage()
	ch <- prometheus.MustNewConstMetric(c.modules, prometheus.GaugeValue, float64(n))
	ch <- prometheus.MustNewConstMetric(c.bytes, prometheus.GaugeValue, float64(size))
	if count, err := c.store.CountVolumes(); err == nil {
		ch <- prometheus.MustNewConstMetric(c.volumes, prometheus.GaugeValue, float64(count))
	}
}
