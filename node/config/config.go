// Package config reads the driver's --config file: registries (insecure,
// mirrors, blocked networks), limits, validation and the pre-pull list, and
// watches it for changes (including kubelet's ConfigMap symlink swap).
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
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/fsnotify/fsnotify"
	"k8s.io/apimachinery/pkg/api/resource"
	"sigs.k8s.io/yaml"

	"github.com/wasm-csi/wasm-csi/node/wasmcheck"
	"github.com/wasm-csi/wasm-csi/puller"
)

// FileConfig is the --config YAML file:
//
//	registries:
//	  insecure: [registry.local:5000]      # plain HTTP, added to --insecure-registry
//	  mirrors:                             # tried first, the registry itself after
//	    ghcr.io: [mirror.internal:5000]
//	  blockedCIDRs: [10.0.0.0/8]           # never dialed, besides loopback, link-local, metadata
//	limits:
//	  maxModuleSize: 256Mi                 # a larger module is refused
//	  maxStoreSize: 10Gi                   # unused modules are removed past this
//	  unusedModuleAge: 168h                # unused modules older than this are removed
//	  minimumModuleAge: 2m                 # never removed within this of their last use
//	validation: proxy-wasm                 # proxy-wasm | wasm | none
//	prePull:                               # pulled on start and on change
//	- image: ghcr.io/acme/filters/header:1.2.0
type FileConfig struct {
	Registries RegistriesConfig `json:"registries"`
	Limits     LimitsConfig     `json:"limits"`
	Validation string           `json:"validation,omitempty"`
	PrePull    []PrePullImage   `json:"prePull,omitempty"`
}

// RegistriesConfig is how registries are reached.
type RegistriesConfig struct {
	Insecure []string            `json:"insecure,omitempty"`
	Mirrors  map[string][]string `json:"mirrors,omitempty"`
	// BlockedCIDRs are networks never dialed for an image (unless the host
	// is named in insecure, a mirror or --insecure-registry), beside the
	// loopback, link-local and cloud-metadata addresses that always are.
	BlockedCIDRs []string `json:"blockedCIDRs,omitempty"`
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
}

// MinimumModuleAgeFloor is the least limits.minimumModuleAge: a module just
// pulled must outlive the publish that pulled it.
const MinimumModuleAgeFloor = 30 * time.Second

// PrePullImage is an image every node pulls before any pod asks for it.
type PrePullImage struct {
	Image string `json:"image"`
}

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
	if _, err := wasmcheck.ParseMode(c.Validation); err != nil {
		errs = append(errs, fmt.Errorf("validation: %w", err))
	}
	for i, p := range c.PrePull {
		if _, err := puller.ParseReference(p.Image); err != nil {
			errs = append(errs, fmt.Errorf("prePull[%d]: %w", i, err))
		}
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

// Watcher re-reads the config file when it changes, including the
// atomic "..data" symlink swap kubelet uses for ConfigMap volumes. A file
// that fails to parse keeps the last good config and is logged with why.
type Watcher struct {
	Path  string
	Log   *slog.Logger
	Apply func(FileConfig)
	// Debounce coalesces bursts of events (default 200ms).
	Debounce time.Duration

	last [32]byte
}

// Load reads the file once and applies it. A missing file applies the
// defaults; a bad file is an error and applies nothing.
func (w *Watcher) Load() error {
	data, err := os.ReadFile(w.Path)
	if errors.Is(err, os.ErrNotExist) {
		w.Log.Warn("config file not found; using defaults until it appears", "path", w.Path)
		w.Apply(FileConfig{})
		return nil
	}
	if err != nil {
		return fmt.Errorf("reading config %s: %w", w.Path, err)
	}
	sum := sha256.Sum256(data)
	if sum == w.last {
		return nil
	}
	c, err := ParseFileConfig(data)
	if err != nil {
		return fmt.Errorf("config %s: %w", w.Path, err)
	}
	w.last = sum
	w.Apply(c)
	w.Log.Info("config loaded", "path", w.Path, "insecure", len(c.Registries.Insecure),
		"mirrors", len(c.Registries.Mirrors), "prePull", len(c.PrePull), "validation", c.Validation)
	return nil
}

// Run watches the file's directory until ctx ends. It watches the
// directory, not the file, so renames and symlink swaps are seen.
func (w *Watcher) Run(ctx context.Context) error {
	if w.Debounce <= 0 {
		w.Debounce = 200 * time.Millisecond
	}
	fw, err := fsnotify.NewWatcher()
	if err != nil {
		return err
	}
	defer fw.Close()
	dir := filepath.Dir(w.Path)
	if err := fw.Add(dir); err != nil {
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
			if err := w.Load(); err != nil {
				w.Log.Error("config not applied; keeping the last good config", "path", w.Path, "err", err)
			}
		}
	}
}
