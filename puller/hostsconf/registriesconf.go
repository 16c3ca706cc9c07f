package hostsconf

import (
	"fmt"
	"path/filepath"
	"strings"

	"go.podman.io/image/v5/docker/reference"
	"go.podman.io/image/v5/pkg/sysregistriesv2"
	"go.podman.io/image/v5/types"

	"github.com/wasm-csi/wasm-csi/puller/errdefs"
)

// registriesConf is a registries.conf and its drop-in directory, read by
// containers/image's own code (sysregistriesv2), as CRI-O and podman read
// them: <dir of file>/registries.conf.d/*.conf merged over the file, in
// name order.
type registriesConf struct {
	sys *types.SystemContext
	// conf is the last configuration that parsed (nil: none yet).
	conf *sysregistriesv2.V2RegistriesConf
}

func newRegistriesConf(file string) *registriesConf {
	return &registriesConf{sys: &types.SystemContext{
		SystemRegistriesConfPath:    file,
		SystemRegistriesConfDirPath: filepath.Join(filepath.Dir(file), "registries.conf.d"),
	}}
}

// dropInDir is the drop-in directory read with the file.
func (c *registriesConf) dropInDir() string { return c.sys.SystemRegistriesConfDirPath }

// load re-reads the file and its drop-ins. When they do not parse,
// containers/image's cache keeps the last configuration that did, and the
// error is returned.
func (c *registriesConf) load() error {
	conf, err := sysregistriesv2.TryUpdatingCache(c.sys)
	if err != nil {
		return fmt.Errorf("%s (with %s/*.conf): %w", c.sys.SystemRegistriesConfPath, c.dropInDir(), err)
	}
	c.conf = conf
	return nil
}

// endpoints lists where image (a canonical "registry/repo:tag" or
// "registry/repo@digest") is pulled from: the mirrors registries.conf allows
// for this kind of reference (pull-from-mirror, mirror-by-digest-only),
// then the registry's location. The registry itself, not rewritten, when
// no [[registry]] matches.
func (c *registriesConf) endpoints(image string) (mirrors []Endpoint, primary *Endpoint, err error) {
	if c.conf == nil {
		return nil, nil, nil
	}
	named, err := reference.ParseNormalizedNamed(image)
	if err != nil {
		return nil, nil, fmt.Errorf("%s: %w", image, err)
	}
	reg, err := sysregistriesv2.FindRegistry(c.sys, named.String())
	if err != nil || reg == nil {
		return nil, nil, err
	}
	if reg.Blocked {
		return nil, nil, fmt.Errorf("%w: [[registry]] prefix %q in %s has blocked = true", errdefs.ErrRegistryBlocked, reg.Prefix, c.sys.SystemRegistriesConfPath)
	}
	sources, err := reg.PullSourcesFromReference(named)
	if err != nil {
		return nil, nil, err
	}
	for i, s := range sources {
		ep := Endpoint{
			Registry:   reference.Domain(s.Reference),
			Repository: reference.Path(s.Reference),
			Scheme:     "https",
			Root:       "/v2",
			Insecure:   s.Endpoint.Insecure,
			SkipVerify: s.Endpoint.Insecure,
			Resolve:    true,
			Pull:       true,
			Origin:     c.sys.SystemRegistriesConfPath,
		}
		if i == len(sources)-1 {
			primary = &ep
			break
		}
		ep.Mirror = true
		mirrors = append(mirrors, ep)
	}
	return mirrors, primary, nil
}

// names reports whether registries.conf names hostport as a location or a
// mirror.
func (c *registriesConf) names(hostport string) bool {
	if c.conf == nil {
		return false
	}
	match := func(loc string) bool {
		host, _, _ := strings.Cut(loc, "/")
		return host != "" && (Endpoint{Registry: host, Insecure: true}).names(hostport)
	}
	for _, r := range c.conf.Registries {
		if match(r.Location) {
			return true
		}
		for _, m := range r.Mirrors {
			if match(m.Location) {
				return true
			}
		}
	}
	return false
}
