package hostsconf

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/fsnotify/fsnotify"
	"github.com/prometheus/client_golang/prometheus"
)

// Options says where the runtime's files are. Either may be empty.
type Options struct {
	// HostsDir is containerd's hosts directory (/etc/containerd/certs.d).
	HostsDir string
	// RegistriesConf is CRI-O's and podman's registries.conf; its drop-ins
	// are read from registries.conf.d beside it.
	RegistriesConf string
	// Log receives what was loaded and why a file was not.
	Log *slog.Logger
	// Metrics counts files that did not parse (nil: not counted).
	Metrics *Metrics
	// Debounce coalesces bursts of file events (default 200ms).
	Debounce time.Duration
}

// Metrics are the resolver's Prometheus metrics, labelled by file kind
// ("hosts.toml" or "registries.conf"), never by path.
type Metrics struct {
	errors *prometheus.CounterVec
	good   *prometheus.GaugeVec
}

// NewMetrics registers the metrics in reg.
func NewMetrics(reg prometheus.Registerer) (*Metrics, error) {
	m := &Metrics{
		errors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "wasmcsi", Name: "runtime_config_errors_total",
			Help: "Loads of the runtime's registry configuration (hosts.toml, registries.conf) that did not parse; the last good configuration stays in force.",
		}, []string{"file"}),
		good: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Namespace: "wasmcsi", Name: "runtime_config_valid",
			Help: "1 when the last load of the runtime's registry configuration parsed, 0 when the last good one is in force instead.",
		}, []string{"file"}),
	}
	for _, c := range []prometheus.Collector{m.errors, m.good} {
		if err := reg.Register(c); err != nil {
			return nil, err
		}
	}
	return m, nil
}

func (m *Metrics) loaded(kind string, err error) {
	if m == nil {
		return
	}
	if err != nil {
		m.errors.WithLabelValues(kind).Inc()
		m.good.WithLabelValues(kind).Set(0)
		return
	}
	m.good.WithLabelValues(kind).Set(1)
}

// Resolver is the runtime's registry configuration as last read. Its
// methods are safe for concurrent use.
type Resolver struct {
	opts Options
	log  *slog.Logger

	mu    sync.RWMutex
	hosts map[string]*hostsFile
	regs  *registriesConf
}

// New reads the files once. Files that do not parse are logged and
// counted; the resolver works with what did.
func New(opts Options) *Resolver {
	if opts.Debounce <= 0 {
		opts.Debounce = 200 * time.Millisecond
	}
	log := opts.Log
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	r := &Resolver{opts: opts, log: log, hosts: map[string]*hostsFile{}}
	if opts.RegistriesConf != "" {
		r.regs = newRegistriesConf(opts.RegistriesConf)
	}
	r.Reload()
	return r
}

// Reload re-reads both files. What does not parse keeps its last good
// version; the error is logged and counted.
func (r *Resolver) Reload() {
	if r.opts.HostsDir != "" {
		r.mu.RLock()
		last := r.hosts
		r.mu.RUnlock()
		hosts, errs := loadHostsDir(r.opts.HostsDir, last)
		r.mu.Lock()
		r.hosts = hosts
		r.mu.Unlock()
		err := errors.Join(errs...)
		r.opts.Metrics.loaded("hosts.toml", err)
		if err != nil {
			r.log.Error("containerd hosts.toml not applied; the last good version of each file stays in force",
				"dir", r.opts.HostsDir, "err", err)
		} else {
			r.log.Info("containerd hosts.toml loaded", "dir", r.opts.HostsDir, "registries", len(hosts))
		}
	}
	if r.regs != nil {
		r.mu.Lock()
		err := r.regs.load()
		n := 0
		if r.regs.conf != nil {
			n = len(r.regs.conf.Registries)
		}
		r.mu.Unlock()
		r.opts.Metrics.loaded("registries.conf", err)
		if err != nil {
			r.log.Error("registries.conf not applied; the last good version stays in force",
				"path", r.opts.RegistriesConf, "err", err)
		} else {
			r.log.Info("registries.conf loaded", "path", r.opts.RegistriesConf, "registries", n)
		}
	}
}

// Endpoints lists where an image is fetched from, in the order tried:
// hosts.toml's hosts in file order, registries.conf's mirrors, then the
// registry itself (as hosts.toml's server or registries.conf's location
// replace it). digest is the image's digest, or empty when it names a tag.
// Nothing configured gives the registry alone. A registry blocked by
// registries.conf is errdefs.ErrRegistryBlocked.
func (r *Resolver) Endpoints(registry, repository, tag, digest string) ([]Endpoint, error) {
	r.mu.RLock()
	defer r.mu.RUnlock()
	var out []Endpoint
	primary := Endpoint{Registry: registry, Repository: repository, Scheme: "https", Root: "/v2", Resolve: true, Pull: true}
	havePrimary := false
	if hf := r.hostsFor(registry); hf != nil {
		for _, h := range hf.hosts {
			h.Repository = repository
			if h.Mirror {
				out = append(out, h)
				continue
			}
			if h.Registry == "" {
				h.Registry = registry
			}
			primary, havePrimary = h, hf.server
		}
	}
	if r.regs != nil {
		image := registry + "/" + repository
		if digest != "" {
			image += "@" + digest
		} else {
			image += ":" + tag
		}
		mirrors, p, err := r.regs.endpoints(image)
		if err != nil {
			return nil, err
		}
		out = append(out, mirrors...)
		if p != nil && !havePrimary {
			// Keep hosts.toml's TLS and header settings for the registry
			// itself; registries.conf says where it is and how insecure.
			primary.Registry, primary.Repository, primary.Insecure = p.Registry, p.Repository, p.Insecure
			primary.SkipVerify = primary.SkipVerify || p.Insecure
			if primary.Origin == "" {
				primary.Origin = p.Origin
			}
		}
	}
	return append(out, primary), nil
}

// hostsFor is the hosts.toml that applies to registry: its own directory,
// else _default.
func (r *Resolver) hostsFor(registry string) *hostsFile {
	for _, name := range hostDirNames(registry) {
		if hf, ok := r.hosts[name]; ok {
			return hf
		}
	}
	return nil
}

// Names reports whether the runtime's configuration names hostport
// ("host:port" as dialed) as a mirror, a server or a location: such hosts
// are the operator's, and may be on loopback or private addresses.
func (r *Resolver) Names(hostport string) bool {
	if r == nil {
		return false
	}
	r.mu.RLock()
	defer r.mu.RUnlock()
	for _, hf := range r.hosts {
		for _, h := range hf.hosts {
			if h.Registry != "" && h.names(hostport) {
				return true
			}
		}
	}
	return r.regs != nil && r.regs.names(hostport)
}

// Run re-reads the files when they or their directories change, until ctx
// ends. Directories are watched, not files, so that renames, symlink swaps
// (a ConfigMap or hostPath update) and files that appear later are seen.
func (r *Resolver) Run(ctx context.Context) error {
	var dirs []string
	if d := r.opts.HostsDir; d != "" {
		dirs = append(dirs, d, filepath.Dir(d))
	}
	if r.regs != nil {
		dirs = append(dirs, filepath.Dir(r.opts.RegistriesConf), r.regs.dropInDir())
	}
	fw, err := fsnotify.NewWatcher()
	if err != nil {
		return err
	}
	defer fw.Close()
	watched := map[string]bool{}
	// watch adds the directories that exist now, and the hosts dir's
	// subdirectories (one per registry).
	watch := func() {
		add := func(d string) {
			if watched[d] {
				return
			}
			if err := fw.Add(d); err == nil {
				watched[d] = true
			}
		}
		for _, d := range dirs {
			add(d)
		}
		if d := r.opts.HostsDir; d != "" {
			entries, _ := os.ReadDir(d)
			for i, e := range entries {
				if i >= maxHostDirs {
					break
				}
				if e.IsDir() {
					add(filepath.Join(d, e.Name()))
				}
			}
		}
	}
	watch()
	var timer <-chan time.Time
	for {
		select {
		case <-ctx.Done():
			return nil
		case ev, ok := <-fw.Events:
			if !ok {
				return nil
			}
			if ev.Has(fsnotify.Remove) || ev.Has(fsnotify.Rename) {
				delete(watched, ev.Name)
			}
			timer = time.After(r.opts.Debounce)
		case err, ok := <-fw.Errors:
			if !ok {
				return nil
			}
			r.log.Warn("watching the runtime's registry configuration", "err", err)
		case <-timer:
			timer = nil
			watch()
			r.Reload()
		}
	}
}

// String describes the resolver for logs.
func (r *Resolver) String() string {
	return fmt.Sprintf("hostsDir=%q registriesConf=%q", r.opts.HostsDir, r.opts.RegistriesConf)
}
