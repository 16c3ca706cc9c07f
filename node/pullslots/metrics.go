package pullslots

import "github.com/prometheus/client_golang/prometheus"

// Collector exposes the slots as gauges read at scrape time, without any
// per-image label: downloads holding a slot, downloads waiting for one, and
// the number of slots.
func (s *Slots) Collector() prometheus.Collector {
	return &collector{
		s:        s,
		inFlight: prometheus.NewDesc("wasmcsi_pulls_in_flight", "Module downloads holding a pull slot.", nil, nil),
		waiting:  prometheus.NewDesc("wasmcsi_pulls_waiting", "Module downloads waiting for a pull slot (limits.maxConcurrentPulls).", nil, nil),
		slots:    prometheus.NewDesc("wasmcsi_pull_slots", "Pull slots: limits.maxConcurrentPulls.", nil, nil),
	}
}

type collector struct {
	s                        *Slots
	inFlight, waiting, slots *prometheus.Desc
}

func (c *collector) Describe(ch chan<- *prometheus.Desc) {
	ch <- c.inFlight
	ch <- c.waiting
	ch <- c.slots
}

func (c *collector) Collect(ch chan<- prometheus.Metric) {
	running, waiting := c.s.Counts()
	ch <- prometheus.MustNewConstMetric(c.inFlight, prometheus.GaugeValue, float64(running))
	ch <- prometheus.MustNewConstMetric(c.waiting, prometheus.GaugeValue, float64(waiting))
	ch <- prometheus.MustNewConstMetric(c.slots, prometheus.GaugeValue, float64(c.s.Limit()))
}
