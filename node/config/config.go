// Package config reads the driver's --config file: registries (allowed
// images, insecure, mirrors, blocked networks), limits, validation and the
// pre-pull list, and watches it for changes (the file itself and kubelet's
// ConfigMap symlink swap, nothing else in its directory).
//
// It owns: the file's schema, its strict parsing and the checks of its
// values, and the watcher that re-reads it.
//
// It must not: apply a config (its Apply callback, the Service's
// Reconfigure, does), reach a registry or touch the store.
package config

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/fsnotify/fsnotify"
	"k8s.io/apimachinery/pkg/api/resource"
	"sigs.k8s.io/yaml"

	"github.com/wasm-csi/wasm-csi/node/store"
	"github.com/wasm-csi/wasm-csi/node/wasmcheck"
	"github.com/wasm-csi/wasm-csi/puller"
	"github.com/wasm-csi/wasm-csi/puller/imagematch"
	"github.com/wasm-csi/wasm-csi/puller/verify"
)

// FileConfig is the --config YAML file:
//
//	registries:
//	  allowed: [ghcr.io/acme]              # if set, the only images pods and prePull may name
//	  insecure: [registry.local:5000]      # plain HTTP, added to --insecure-registry
//	  mirrors:                             # tried first, the registry itself after
//	    ghcr.io: [mirror.internal:5000]
//	  blockedCIDRs: [10.0.0.0/8]           # never dialed, besides loopback, link-local, metadata
//	  containerdHostsDir: /etc/containerd/certs.d      # the runtime's mirrors, tried next
//	  registriesConf: /etc/containers/registries.conf  # (CRI-O/podman; with registries.conf.d)
//	limits:
//	  maxModuleSize: 256Mi                 # a larger module is refused
//	  maxStoreSize: 10Gi                   # unused modules are removed past this
//	  unusedModuleAge: 168h                # unused modules older than this are removed
//	  minimumModuleAge: 2m                 # never removed within this of their last use
//	  maxConcurrentPulls: 4                # downloads in flight; more wait for a slot
//	validation: proxy-wasm                 # proxy-wasm | wasm | none
//	prePull:                               # pulled on start and on change
//	- image: ghcr.io/acme/filters/header:1.2.0
type FileConfig struct {
	Registries RegistriesConfig `json:"registries"`
	Limits     LimitsConfig     `json:"limits"`
	Validation string           `json:"validation,omitempty"`
	PrePull    []PrePullImage   `json:"prePull,omitempty"`
	// Verification is which signatures images must carry (README
	// "Verifying modules").
	Verification verify.Spec `json:"verification,omitempty"`
}

// VerificationPolicies compiles the verification section, reading the
// keys, certificates and trusted roots it names; policy images are
// matched as registries.allowed patterns are.
func (c FileConfig) VerificationPolicies() (*verify.Policies, error) {
	return verify.Compile(c.Verification, verify.Options{NewMatcher: func(patterns []string) (func(string, string) bool, error) {
		l, err := imagematch.ParseList(patterns)
		if err != nil {
			return nil, err
		}
		return func(registry, repository string) bool {
			_, ok := l.Match(registry, repository)
			return ok
		}, nil
	}})
}

// RegistriesConfig is which images may be named and how registries are
// reached.
type RegistriesConfig struct {
	// Allowed, if set, lists the only images a pod or prePull may name, as
	// HOST[:PORT][/PATH] patterns (puller/imagematch). Unset (nil) allows
	// every image; an empty list allows none.
	Allowed  *[]string           `json:"allowed,omitempty"`
	Insecure []string            `json:"insecure,omitempty"`
	Mirrors  map[string][]string `json:"mirrors,omitempty"`
	// BlockedCIDRs are networks never dialed for an image (unless the host
	// is named in insecure, a mirror or --insecure-registry), beside the
	// loopback, link-local and cloud-metadata addresses that always are.
	BlockedCIDRs []string `json:"blockedCIDRs,omitempty"`
	// ContainerdHostsDir is containerd's hosts directory
	// (<dir>/<host>/hosts.toml, <dir>/_default/hosts.toml).
	ContainerdHostsDir string `json:"containerdHostsDir,omitempty"`
	// RegistriesConf is CRI-O's and podman's registries.conf (v2); the
	// drop-ins in registries.conf.d beside it are read with it.
	RegistriesConf string `json:"registriesConf,omitempty"`
}

// AllowedImages parses registries.allowed. restricted is false when the key
// is not set (every image allowed).
func (r RegistriesConfig) AllowedImages() (list imagematch.List, restricted bool, err error) {
	if r.Allowed == nil {
		return nil, false, nil
	}
	var errs []error
	for i, s := range *r.Allowed {
		p, err := imagematch.Parse(s)
		if err != nil {
			errs = append(errs, fmt.Errorf("registries.allowed[%d]: %w", i, err))
			continue
		}
		list = append(list, p)
	}
	if len(errs) > 0 {
		return nil, true, errors.Join(errs...)
	}
	return list, true, nil
}

func (c FileConfig) allowedPatterns() []string {
	if c.Registries.Allowed == nil {
		return nil
	}
	return *c.Registries.Allowed
}

// BlockedNetworks parses registries.blockedCIDRs.
func (r RegistriesConfig) BlockedNetworks() ([]netip.Prefix, error) {
	var out []netip.Prefix
	var errs []error
	for _, c := range r.BlockedCIDRs {
		p, err := netip.ParsePrefix(strings.TrimSpace(c))
		if err != nil {
			errs = append(errs, fmt.Errorf("registries.blockedCIDRs: %q is not a CIDR like 10.0.0.0/8 or fd00::/8", c))
			continue
		}
		out = append(out, p.Masked())
	}
	return out, errors.Join(errs...)
}

// LimitsConfig bounds what the store holds.
type LimitsConfig struct {
	MaxModuleSize   *resource.Quantity `json:"maxModuleSize,omitempty"`
	MaxStoreSize    *resource.Quantity `json:"maxStoreSize,omitempty"`
	UnusedModuleAge string             `json:"unusedModuleAge,omitempty"`
	// MinimumModuleAge protects a module used this recently from removal,
	// whatever maxStoreSize and unusedModuleAge say (kubelet's
	// imageMinimumGCAge). Default 2m; at least MinimumModuleAgeFloor.
	MinimumModuleAge string `json:"minimumModuleAge,omitempty"`
	// MaxConcurrentPulls bounds the downloads in flight (kubelet's
	// maxParallelImagePulls); nil: pullslots.DefaultLimit.
	MaxConcurrentPulls *int `json:"maxConcurrentPulls,omitempty"`
}

// MinimumModuleAgeFloor is the least limits.minimumModuleAge: a module just
// pulled must outlive the publish that pulled it.
const MinimumModuleAgeFloor = 30 * time.Second

// PrePullImage is an image every node pulls before any pod asks for it.
type PrePullImage struct {
	Image string `json:"image"`
}

// maxPullSlots caps limits.maxConcurrentPulls: each download in flight
// holds memory and a connection.
const maxPullSlots = 64

// ParseFileConfig reads a config file strictly: unknown fields and bad
// values are errors naming the field.
func ParseFileConfig(data []byte) (FileConfig, error) {
	var c FileConfig
	if len(bytes.TrimSpace(data)) == 0 {
		return c, nil
	}
	if err := yaml.UnmarshalStrict(data, &c); err != nil {
		return FileConfig{}, err
	}
	return c, c.Validate()
}

// Validate checks values the YAML decoder cannot.
func (c FileConfig) Validate() error {
	var errs []error
	for _, h := range c.Registries.Insecure {
		if err := checkHost(h); err != nil {
			errs = append(errs, fmt.Errorf("registries.insecure: %w", err))
		}
	}
	for reg, mirrors := range c.Registries.Mirrors {
		if err := checkHost(reg); err != nil {
			errs = append(errs, fmt.Errorf("registries.mirrors: %w", err))
		}
		for _, m := range mirrors {
			if err := checkHost(m); err != nil {
				errs = append(errs, fmt.Errorf("registries.mirrors[%s]: %w", reg, err))
			}
		}
	}
	for key, p := range map[string]string{"containerdHostsDir": c.Registries.ContainerdHostsDir, "registriesConf": c.Registries.RegistriesConf} {
		if p != "" && !filepath.IsAbs(p) {
			errs = append(errs, fmt.Errorf("registries.%s: %q is not an absolute path (the host's, as the DaemonSet mounts it)", key, p))
		}
	}
	if _, err := c.Registries.BlockedNetworks(); err != nil {
		errs = append(errs, err)
	}
	if q := c.Limits.MaxModuleSize; q != nil && q.Sign() <= 0 {
		errs = append(errs, fmt.Errorf("limits.maxModuleSize must be positive, not %s", q))
	}
	if q := c.Limits.MaxStoreSize; q != nil && q.Sign() <= 0 {
		errs = append(errs, fmt.Errorf("limits.maxStoreSize must be positive, not %s", q))
	}
	if _, err := c.UnusedModuleAge(); err != nil {
		errs = append(errs, err)
	}
	if _, err := c.MinimumModuleAge(); err != nil {
		errs = append(errs, err)
	}
	if n := c.Limits.MaxConcurrentPulls; n != nil && (*n < 1 || *n > maxPullSlots) {
		errs = append(errs, fmt.Errorf("limits.maxConcurrentPulls must be between 1 and %d, not %d", maxPullSlots, *n))
	}
	if _, err := wasmcheck.ParseMode(c.Validation); err != nil {
		errs = append(errs, fmt.Errorf("validation: %w", err))
	}
	allowed, restricted, err := c.Registries.AllowedImages()
	if err != nil {
		errs = append(errs, err)
	}
	for i, p := range c.PrePull {
		ref, err := puller.ParseReference(p.Image)
		if err != nil {
			errs = append(errs, fmt.Errorf("prePull[%d]: %w", i, err))
			continue
		}
		if _, ok := allowed.Match(ref.Registry, ref.Repository); restricted && !ok {
			errs = append(errs, fmt.Errorf("prePull[%d]: image %s is outside registries.allowed; add a pattern for it or remove it from prePull", i, p.Image))
		}
	}
	// Keys, certificates and trusted roots are read here, so a policy
	// naming a missing or bad file keeps the last good config.
	if _, err := c.VerificationPolicies(); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// UnusedModuleAge parses limits.unusedModuleAge: a Go duration, or a
// number of days like "7d". Zero means never.
func (c FileConfig) UnusedModuleAge() (time.Duration, error) {
	return parseAge("limits.unusedModuleAge", c.Limits.UnusedModuleAge, "168h or 7d")
}

// MinimumModuleAge parses limits.minimumModuleAge like unusedModuleAge;
// empty is store.DefaultMinimumModuleAge (returned as 0), less than
// MinimumModuleAgeFloor is an error.
func (c FileConfig) MinimumModuleAge() (time.Duration, error) {
	d, err := parseAge("limits.minimumModuleAge", c.Limits.MinimumModuleAge, "2m or 1h")
	if err != nil {
		return 0, err
	}
	if strings.TrimSpace(c.Limits.MinimumModuleAge) != "" && d < MinimumModuleAgeFloor {
		return 0, fmt.Errorf("limits.minimumModuleAge %s is less than %s: a module just pulled must outlive the publish that pulled it", d, MinimumModuleAgeFloor)
	}
	return d, nil
}

// GCPolicy is the garbage collection the limits ask for.
func (c FileConfig) GCPolicy() (store.GCPolicy, error) {
	age, err := c.UnusedModuleAge()
	if err != nil {
		return store.GCPolicy{}, err
	}
	minAge, err := c.MinimumModuleAge()
	if err != nil {
		return store.GCPolicy{}, err
	}
	p := store.GCPolicy{MaxAge: age, MinimumAge: minAge}
	if q := c.Limits.MaxStoreSize; q != nil {
		p.MaxStoreBytes = q.Value()
	}
	return p, nil
}

// parseAge parses a Go duration or a number of days like "7d"; empty is 0.
func parseAge(key, value, example string) (time.Duration, error) {
	s := strings.TrimSpace(value)
	if s == "" {
		return 0, nil
	}
	if days, ok := strings.CutSuffix(s, "d"); ok {
		var n int
		if _, err := fmt.Sscanf(days, "%d", &n); err != nil || n < 0 || fmt.Sprint(n) != days {
			return 0, fmt.Errorf("%s %q is not a duration like %s", key, s, example)
		}
		return time.Duration(n) * 24 * time.Hour, nil
	}
	d, err := time.ParseDuration(s)
	if err != nil || d < 0 {
		return 0, fmt.Errorf("%s %q is not a duration like %s", key, s, example)
	}
	return d, nil
}

func checkHost(h string) error {
	if h == "" || strings.ContainsAny(h, "/ \t") || strings.Contains(h, "://") {
		return fmt.Errorf("%q is not a HOST or HOST:PORT", h)
	}
	return nil
}

// MaxConfigFileSize bounds how much of the config file is read: a larger
// file is refused, not parsed.
const MaxConfigFileSize = 1 << 20

// Watcher re-reads the config file when it changes: the file itself
// (written in place, or renamed over) or kubelet's atomic "..data" symlink
// swap for ConfigMap volumes, nothing else in its directory. A file that
// cannot be read, is over MaxConfigFileSize or does not parse is refused:
// the config in force stays, and the refusal is logged once per content
// (not once per event).
type Watcher struct {
	Path string
	Log  *slog.Logger
	// Apply puts a parsed config in force; an error refuses it as a parse
	// error would.
	Apply func(FileConfig) error
	// Refused, if set, is told each new refusal (also the one Load returns).
	Refused func(error)
	// Debounce coalesces bursts of events (default 200ms).
	Debounce time.Duration

	mu      sync.Mutex
	applied bool     // a config from the file is in force
	last    [32]byte // its content's sha256
	badKey  string   // what was refused last ("" when the file in force is the file on disk)
}

// Load reads the file and applies it. An error (a missing, unreadable,
// oversized or invalid file, or one Apply refuses) applies nothing; it is
// logged and passed to Refused unless it is the same refusal as the last.
func (w *Watcher) Load() error {
	w.mu.Lock()
	defer w.mu.Unlock()
	data, key, err := w.read()
	if err == nil {
		sum := sha256.Sum256(data)
		if w.applied && sum == w.last && w.badKey == "" {
			return nil // unchanged
		}
		key = hex.EncodeToString(sum[:])
		var c FileConfig
		if c, err = ParseFileConfig(data); err == nil {
			err = w.Apply(c)
		}
		if err == nil {
			w.applied, w.last, w.badKey = true, sum, ""
			w.Log.Info("config loaded", "path", w.Path, "allowed", len(c.allowedPatterns()), "insecure", len(c.Registries.Insecure),
				"mirrors", len(c.Registries.Mirrors), "containerdHostsDir", c.Registries.ContainerdHostsDir,
				"registriesConf", c.Registries.RegistriesConf, "prePull", len(c.PrePull), "validation", c.Validation,
				"verificationPolicies", len(c.Verification.Policies))
			return nil
		}
		err = fmt.Errorf("config %s: %w", w.Path, err)
	}
	if key != w.badKey {
		w.badKey = key
		if w.applied {
			w.Log.Error("config not applied; keeping the last good config", "path", w.Path, "err", err)
		} else {
			w.Log.Error("config not applied; no module is served until it is fixed", "path", w.Path, "err", err)
		}
		if w.Refused != nil {
			w.Refused(err)
		}
	}
	return err
}

// read returns the file's bytes, or an error and a key naming it (so the
// same failure is reported once).
func (w *Watcher) read() ([]byte, string, error) {
	f, err := os.Open(w.Path)
	if errors.Is(err, os.ErrNotExist) {
		return nil, "missing", fmt.Errorf("config file %s not found; create it (an empty file means the defaults) or drop --config", w.Path)
	}
	if err != nil {
		return nil, "open:" + err.Error(), fmt.Errorf("reading config %s: %w", w.Path, err)
	}
	defer f.Close()
	data, err := io.ReadAll(io.LimitReader(f, MaxConfigFileSize+1))
	if err != nil {
		return nil, "read:" + err.Error(), fmt.Errorf("reading config %s: %w", w.Path, err)
	}
	if len(data) > MaxConfigFileSize {
		return nil, "size", fmt.Errorf("config %s is over %d bytes; it is not read", w.Path, MaxConfigFileSize)
	}
	return data, "", nil
}

// Run watches the file's directory until ctx ends, reloading on changes to
// the file or to kubelet's "..data" link. It watches the directory, not the
// file, so renames and symlink swaps are seen.
func (w *Watcher) Run(ctx context.Context) error {
	if w.Debounce <= 0 {
		w.Debounce = 200 * time.Millisecond
	}
	fw, err := fsnotify.NewWatcher()
	if err != nil {
		return err
	}
	defer fw.Close()
	dir, name := filepath.Split(filepath.Clean(w.Path))
	if err := fw.Add(filepath.Clean(dir)); err != nil {
		return fmt.Errorf("watching %s: %w", dir, err)
	}
	var timer <-chan time.Time
	for {
		select {
		case <-ctx.Done():
			return nil
		case ev, ok := <-fw.Events:
			if !ok {
				return nil
			}
			if base := filepath.Base(ev.Name); base != name && base != "..data" {
				continue // another file beside the config: a log, an editor's swap file
			}
			if ev.Has(fsnotify.Chmod) && !ev.Has(fsnotify.Write) {
				continue
			}
			timer = time.After(w.Debounce)
		case err, ok := <-fw.Errors:
			if !ok {
				return nil
			}
			w.Log.Warn("config watch error", "path", w.Path, "err", err)
		case <-timer:
			timer = nil
			_ = w.Load() // logged and reported by Load, once per refusal
		}
	}
}
