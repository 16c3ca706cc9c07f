package node

import (
	"context"
	"strings"
	"sync"

	"github.com/wasm-csi/wasm-csi/node/config"
	"github.com/wasm-csi/wasm-csi/node/metrics"
	"github.com/wasm-csi/wasm-csi/puller"
	"github.com/wasm-csi/wasm-csi/puller/errdefs"
)

// configStatus is whether the config file is in force, and why not.
type configStatus struct {
	mu      sync.Mutex
	applied bool  // a config file has been applied
	err     error // the last refusal, nil when the file on disk is in force
}

// ConfigApplied records that the config file on disk is in force.
func (s *Service) ConfigApplied() {
	s.cfgStatus.mu.Lock()
	s.cfgStatus.applied, s.cfgStatus.err = true, nil
	s.cfgStatus.mu.Unlock()
	s.cfg.Metrics.ConfigState(metrics.ConfigOK)
}

// ConfigRefused records that the config file was refused (it cannot be
// read, does not parse, or is invalid). Before any config file has been
// applied, publishes fail with ErrConfigInvalid naming err and CheckConfig
// fails: a driver whose security settings did not load serves nothing.
// After, the last good config stays in force.
func (s *Service) ConfigRefused(err error) {
	s.cfgStatus.mu.Lock()
	s.cfgStatus.err = err
	applied := s.cfgStatus.applied
	s.cfgStatus.mu.Unlock()
	if applied {
		s.cfg.Metrics.ConfigState(metrics.ConfigLastGood)
	} else {
		s.cfg.Metrics.ConfigState(metrics.ConfigRefused)
	}
}

// refusedConfig returns the refusal that keeps publishes from being
// served, or nil.
func (s *Service) refusedConfig() error {
	s.cfgStatus.mu.Lock()
	defer s.cfgStatus.mu.Unlock()
	if s.cfgStatus.applied {
		return nil
	}
	return s.cfgStatus.err
}

// CheckConfig is a health check: it fails while the driver serves nothing
// because its config file was refused at start.
func (s *Service) CheckConfig(context.Context) error {
	if err := s.refusedConfig(); err != nil {
		return errdefs.New(errdefs.ErrConfigInvalid, "", err, "no module is served until the config file is fixed")
	}
	return nil
}

// admit refuses, before any network request, an image the config does not
// let a pod name, and every image while the config file is refused at start.
func (s *Service) admit(ref puller.Reference) error {
	if err := s.refusedConfig(); err != nil {
		return errdefs.New(errdefs.ErrConfigInvalid, ref.Original, err,
			"the driver's config file was refused at start, so no module is served until it is fixed (the driver's log and /healthz say why)")
	}
	set := s.cur.Load()
	if !set.restricted {
		return nil
	}
	if _, ok := set.allowed.Match(ref.Registry, ref.Repository); ok {
		return nil
	}
	allowed := "none: the list is empty"
	if len(set.allowed) > 0 {
		allowed = strings.Join(set.allowed.Strings(), ", ")
	}
	return errdefs.New(errdefs.ErrNotAllowed, ref.Original, nil,
		"%s is outside registries.allowed in the driver's config (%s); use an image under one of those patterns, or ask the cluster operator to add one",
		ref.Name(), allowed)
}

// ApplyConfigFile puts a config file in force (Reconfigure) and records
// that the file on disk is what is in force.
func (s *Service) ApplyConfigFile(fc config.FileConfig) error {
	if err := s.Reconfigure(fc); err != nil {
		return err
	}
	s.ConfigApplied()
	return nil
}
