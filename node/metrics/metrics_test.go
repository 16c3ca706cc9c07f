package metrics

import (
	"errors"
	"slices"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/wasm-csi/wasm-csi/node/store"
)

// Every label value is exported from the start, at zero, and the store's
// cap is exported as set.
func TestMetricsExportedFromStart(t *testing.T) {
	st, err := store.Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	reg := prometheus.NewRegistry()
	m, err := New(reg, st)
	if err != nil {
		t.Fatal(err)
	}
	for name, want := range map[string]int{
		"wasmcsi_pulls_total":              len(pullResults),
		"wasmcsi_cache_lookups_total":      2,
		"wasmcsi_publish_duration_seconds": 2,
		"wasmcsi_store_max_bytes":          1,
	} {
		n, err := testutil.GatherAndCount(reg, name)
		if err != nil {
			t.Fatal(err)
		}
		if n != want {
			t.Errorf("%s: %d series before anything happened, want %d", name, n, want)
		}
	}
	if v := testutil.ToFloat64(m.pulls.WithLabelValues("no_space")); v != 0 {
		t.Errorf("pulls_total{result=no_space} = %v, want 0", v)
	}
	m.StoreCap(1 << 20)
	if v := testutil.ToFloat64(m.storeMax); v != 1<<20 {
		t.Errorf("store_max_bytes = %v, want %d", v, 1<<20)
	}
	var nilMetrics *Metrics
	nilMetrics.StoreCap(1) // records nothing, does not panic
	for _, err := range []error{nil, errors.New("something else")} {
		if r := PullResult(err); !slices.Contains(pullResults, r) {
			t.Errorf("PullResult(%v) = %q, which is not pre-exported (pullResults %v)", err, r, pullResults)
		}
	}
}

// The config state gauge has one series per state, 1 for the current one.
func TestConfigState(t *testing.T) {
	st, err := store.Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	m, err := New(prometheus.NewRegistry(), st)
	if err != nil {
		t.Fatal(err)
	}
	for i, state := range []string{ConfigOK, ConfigRefused, ConfigLastGood, ConfigOK} {
		if i > 0 { // the first round checks the state New starts in
			m.ConfigState(state)
		}
		for _, s := range []string{ConfigOK, ConfigLastGood, ConfigRefused} {
			want := 0.0
			if s == state {
				want = 1
			}
			if v := testutil.ToFloat64(m.config.WithLabelValues(s)); v != want {
				t.Errorf("after %s: config_state{state=%q} = %v, want %v", state, s, v, want)
			}
		}
	}
	var nilMetrics *Metrics
	nilMetrics.ConfigState(ConfigRefused) // records nothing, does not panic
}
