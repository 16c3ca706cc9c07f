package node

import (
	"context"

	"github.com/wasm-csi/wasm-csi/node/config"
	"github.com/wasm-csi/wasm-csi/puller/hostsconf"
)

// runtimeConf keeps the container runtime's registry configuration
// (registries.containerdHostsDir, registries.registriesConf) loaded and
// watched while the config file names the same paths.
type runtimeConf struct {
	opts     hostsconf.Options
	resolver *hostsconf.Resolver
	cancel   context.CancelFunc
}

// runtimeResolver returns the resolver for the paths fc names, re-using the
// current one when they have not changed (it re-reads its files itself),
// and starts its watch once the service has started. Nil when neither path
// is set.
func (s *Service) runtimeResolver(fc config.FileConfig) *hostsconf.Resolver {
	s.bgMu.Lock()
	defer s.bgMu.Unlock()
	hostsDir, conf := fc.Registries.ContainerdHostsDir, fc.Registries.RegistriesConf
	if cur := s.runtime; cur != nil && cur.opts.HostsDir == hostsDir && cur.opts.RegistriesConf == conf {
		return cur.resolver
	}
	if s.runtime != nil && s.runtime.cancel != nil {
		s.runtime.cancel()
	}
	s.runtime = nil
	if hostsDir == "" && conf == "" {
		return nil
	}
	rc := &runtimeConf{opts: hostsconf.Options{HostsDir: hostsDir, RegistriesConf: conf, Log: s.log, Metrics: s.cfg.RuntimeConfigMetrics}}
	rc.resolver = hostsconf.New(rc.opts)
	s.runtime = rc
	s.watchRuntimeLocked()
	return rc.resolver
}

// watchRuntimeLocked starts watching the runtime's files, once the
// service has a background context. bgMu is held.
func (s *Service) watchRuntimeLocked() {
	rc := s.runtime
	if rc == nil || s.bg == nil || rc.cancel != nil {
		return
	}
	ctx, cancel := context.WithCancel(s.bg)
	rc.cancel = cancel
	go func() {
		if err := rc.resolver.Run(ctx); err != nil {
			s.log.Error("the runtime's registry configuration is not watched; changes apply on restart", "err", err)
		}
	}()
}
