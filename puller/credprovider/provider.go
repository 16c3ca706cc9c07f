package credprovider

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sync/singleflight"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/kubelet/pkg/apis/credentialprovider"
	"oras.land/oras-go/v2/registry/remote/auth"

	"github.com/wasm-csi/wasm-csi/puller"
	"github.com/wasm-csi/wasm-csi/puller/errdefs"
)

// Defaults of Options.
const (
	// DefaultTimeout is kubelet's: one minute for a plugin to answer.
	DefaultTimeout = time.Minute
	// DefaultMaxOutput caps a plugin's stdout. Real answers are a few KiB
	// (an ECR token is about 2 KiB per registry).
	DefaultMaxOutput = 1 << 20
	// DefaultMaxCacheEntries bounds each plugin's cache: pods name the
	// images, so the number of image keys is theirs to grow.
	DefaultMaxCacheEntries = 4096
	// stderrTail is how much of a failing plugin's stderr is logged.
	stderrTail = 2 << 10
)

// Options configures Load.
type Options struct {
	// Config is kubelet's --image-credential-provider-config: a file, or
	// a directory of *.json, *.yaml and *.yml files read in lexical order.
	Config string
	// BinDir is kubelet's --image-credential-provider-bin-dir.
	BinDir string
	// Timeout bounds one run of a plugin (default DefaultTimeout).
	Timeout time.Duration
	// MaxOutput caps a plugin's stdout in bytes (default DefaultMaxOutput).
	MaxOutput int
	// MaxCacheEntries bounds each plugin's cache (default DefaultMaxCacheEntries).
	MaxCacheEntries int
	// Log receives plugin failures (never credentials). Default: discard.
	Log *slog.Logger
	// Now is the clock of the cache (default time.Now).
	Now func() time.Time
	// Metrics receives the plugins' metrics (nil: none).
	Metrics prometheus.Registerer
}

// metrics are per plugin, never per image.
type metrics struct {
	runs     *prometheus.CounterVec
	duration *prometheus.HistogramVec
}

func newMetrics(reg prometheus.Registerer) (*metrics, error) {
	m := &metrics{
		runs: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "wasmcsi", Name: "credential_provider_runs_total",
			Help: "Runs of kubelet credential provider plugins, by plugin and result (success, error, timeout).",
		}, []string{"plugin", "result"}),
		duration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: "wasmcsi", Name: "credential_provider_duration_seconds",
			Help:    "Time a credential provider plugin took to answer, by plugin.",
			Buckets: prometheus.ExponentialBuckets(0.01, 3, 9),
		}, []string{"plugin"}),
	}
	if reg != nil {
		for _, c := range []prometheus.Collector{m.runs, m.duration} {
			if err := reg.Register(c); err != nil {
				return nil, err
			}
		}
	}
	return m, nil
}

// Providers are the configured plugins, in the config's order. It
// implements puller.CredentialProvider and is safe for concurrent use.
type Providers struct {
	plugins []*plugin
	log     *slog.Logger
}

// plugin is one provider of the config: how to run it, and its cache.
type plugin struct {
	name         string
	bin          string
	args         []string
	env          []string
	apiVersion   string
	gv           schema.GroupVersion
	matchImages  []string
	defaultCache time.Duration
	timeout      time.Duration
	maxOutput    int
	codecs       *codecs
	metrics      *metrics
	log          *slog.Logger
	now          func() time.Time

	flight  singleflight.Group
	waiting atomic.Int32 // callers waiting for a run's answer (tests watch it)

	mu         sync.Mutex
	cache      map[string]cacheEntry
	maxEntries int
	runs       int // plugin executions, for tests and the log
}

type cacheEntry struct {
	keyring *puller.Keyring
	expires time.Time
}

// Load reads and validates the config, and finds every plugin's executable
// in BinDir. Any mistake is an error naming the file, provider and field:
// like kubelet, the driver does not start with a config it cannot apply.
func Load(opts Options) (*Providers, error) {
	if opts.Timeout <= 0 {
		opts.Timeout = DefaultTimeout
	}
	if opts.MaxOutput <= 0 {
		opts.MaxOutput = DefaultMaxOutput
	}
	if opts.MaxCacheEntries <= 0 {
		opts.MaxCacheEntries = DefaultMaxCacheEntries
	}
	if opts.Log == nil {
		opts.Log = slog.New(slog.DiscardHandler)
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	providers, err := readConfig(opts.Config)
	if err != nil {
		return nil, fmt.Errorf("credential provider config: %w", err)
	}
	if err := validate(providers); err != nil {
		return nil, fmt.Errorf("credential provider config %s: %w", opts.Config, err)
	}
	cs, err := newCodecs()
	if err != nil {
		return nil, err
	}
	m, err := newMetrics(opts.Metrics)
	if err != nil {
		return nil, err
	}
	ps := &Providers{log: opts.Log}
	for _, p := range providers {
		bin, err := findBinary(opts.BinDir, p.Name)
		if err != nil {
			return nil, fmt.Errorf("credential provider config %s: %w", opts.Config, err)
		}
		env := make([]string, 0, len(p.Env))
		for _, e := range p.Env {
			env = append(env, e.Name+"="+e.Value)
		}
		ps.plugins = append(ps.plugins, &plugin{
			name: p.Name, bin: bin, args: p.Args, env: env,
			apiVersion: p.APIVersion, gv: groupVersion(p.APIVersion),
			matchImages:  p.MatchImages,
			defaultCache: p.DefaultCacheDuration.Duration,
			timeout:      opts.Timeout, maxOutput: opts.MaxOutput,
			codecs: cs, metrics: m, log: opts.Log, now: opts.Now,
			cache: map[string]cacheEntry{}, maxEntries: opts.MaxCacheEntries,
		})
	}
	return ps, nil
}

// Names lists the plugins, in order.
func (ps *Providers) Names() []string {
	var out []string
	for _, p := range ps.plugins {
		out = append(out, p.name)
	}
	return out
}

// failure is a plugin that gave no credential for an image: Unavailable
// (the plugin may answer on a retry; fixing it is the operator's). It names
// the plugin and says why, never what the plugin printed.
func failure(plugin, image, reason string) error {
	return &errdefs.Error{Kind: errdefs.ErrUnavailable, Image: image,
		Msg: fmt.Sprintf("credential provider plugin %s gave no credential: %s", plugin, reason)}
}

// Source is how a plugin's credentials are named in messages.
func Source(plugin string) string { return "credential provider " + plugin }

// Provide returns, for every plugin whose matchImages match ref, in config
// order, the credentials of its answer that match ref (from its cache when
// the answer is still fresh), or a Credential carrying the plugin's failure.
// The plugin is asked for "host[:port]/repository", as kubelet asks it.
func (ps *Providers) Provide(ctx context.Context, ref puller.Reference) []puller.Credential {
	image := ref.Registry + "/" + ref.Repository
	var out []puller.Credential
	for _, p := range ps.plugins {
		if !p.matches(image) {
			continue
		}
		kr, err := p.keyring(ctx, image)
		if err != nil {
			out = append(out, puller.Credential{Source: Source(p.name), Node: true, Err: err})
			continue
		}
		creds := kr.Lookup(ref)
		if len(creds) == 0 {
			p.log.Debug("credential provider plugin answered with no credential for the image", "plugin", p.name, "image", image)
		}
		out = append(out, creds...)
	}
	return out
}

func (p *plugin) matches(image string) bool {
	for _, m := range p.matchImages {
		if matchImage(m, image) {
			return true
		}
	}
	return false
}

// keyring returns the plugin's answer for image: cached, or from one run
// of the plugin shared by every caller asking for the same image meanwhile.
// The run is not tied to a caller: one that gives up stops waiting, the
// others still get the answer.
func (p *plugin) keyring(ctx context.Context, image string) (*puller.Keyring, error) {
	if kr, ok := p.cached(image); ok {
		return kr, nil
	}
	ch := p.flight.DoChan(image, func() (any, error) {
		if kr, ok := p.cached(image); ok { // answered while this caller waited
			return kr, nil
		}
		return p.ask(context.WithoutCancel(ctx), image)
	})
	p.waiting.Add(1)
	defer p.waiting.Add(-1)
	select {
	case r := <-ch:
		if r.Err != nil {
			return nil, r.Err
		}
		return r.Val.(*puller.Keyring), nil
	case <-ctx.Done():
		return nil, failure(p.name, image, "the request ended before it answered: "+ctx.Err().Error())
	}
}

// ask runs the plugin and caches its answer as it says.
func (p *plugin) ask(ctx context.Context, image string) (*puller.Keyring, error) {
	p.mu.Lock()
	p.runs++
	p.mu.Unlock()
	start := time.Now()
	resp, stderr, err := p.run(ctx, image)
	p.metrics.duration.WithLabelValues(p.name).Observe(time.Since(start).Seconds())
	result := "success"
	switch {
	case errors.Is(err, errTimeout):
		result = "timeout"
	case err != nil:
		result = "error"
	}
	p.metrics.runs.WithLabelValues(p.name, result).Inc()
	if err != nil {
		p.log.Warn("credential provider plugin failed", "plugin", p.name, "image", image,
			"err", err, "stderr", strings.TrimSpace(string(stderr)), "duration", time.Since(start))
		return nil, failure(p.name, image, err.Error())
	}
	creds := make(map[string]auth.Credential, len(resp.Auth))
	for key, a := range resp.Auth {
		creds[key] = auth.Credential{Username: a.Username, Password: a.Password}
	}
	kr := puller.NewKeyring(Source(p.name), true, creds)
	ttl := p.defaultCache
	if resp.CacheDuration != nil {
		ttl = resp.CacheDuration.Duration
	}
	p.log.Debug("credential provider plugin answered", "plugin", p.name, "image", image,
		"entries", len(resp.Auth), "cacheKeyType", string(resp.CacheKeyType), "cacheFor", ttl, "duration", time.Since(start))
	if ttl > 0 {
		p.store(cacheKey(resp.CacheKeyType, image), cacheEntry{keyring: kr, expires: p.now().Add(ttl)})
	}
	return kr, nil
}

// cacheKey is where an answer is kept: under the image, its registry, or
// one key for every image, as the plugin's cacheKeyType says.
func cacheKey(t credentialprovider.PluginCacheKeyType, image string) string {
	switch t {
	case credentialprovider.RegistryPluginCacheKeyType:
		return "registry:" + registryOf(image)
	case credentialprovider.GlobalPluginCacheKeyType:
		return "global"
	}
	return "image:" + image
}

func registryOf(image string) string {
	host, _, _ := strings.Cut(image, "/")
	return host
}

// cached looks for a fresh answer under the image, then its registry,
// then the global key, as kubelet does.
func (p *plugin) cached(image string) (*puller.Keyring, bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	now := p.now()
	for _, k := range []string{"image:" + image, "registry:" + registryOf(image), "global"} {
		e, ok := p.cache[k]
		if !ok {
			continue
		}
		if now.After(e.expires) {
			delete(p.cache, k)
			continue
		}
		return e.keyring, true
	}
	return nil, false
}

// store keeps an answer; when the cache is full, expired answers go first,
// then the one that expires soonest.
func (p *plugin) store(key string, e cacheEntry) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if _, ok := p.cache[key]; !ok && len(p.cache) >= p.maxEntries {
		now := p.now()
		soonest := ""
		for k, v := range p.cache {
			if now.After(v.expires) {
				delete(p.cache, k)
				continue
			}
			if soonest == "" || v.expires.Before(p.cache[soonest].expires) {
				soonest = k
			}
		}
		if len(p.cache) >= p.maxEntries {
			delete(p.cache, soonest)
		}
	}
	p.cache[key] = e
}

// Runs reports how many times each plugin has been executed, by name.
func (ps *Providers) Runs() map[string]int {
	out := map[string]int{}
	for _, p := range ps.plugins {
		p.mu.Lock()
		out[p.name] = p.runs
		p.mu.Unlock()
	}
	return out
}
