package puller

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/url"
	"os"
	"path"
	"sort"
	"strings"

	"oras.land/oras-go/v2/registry/remote/auth"

	"github.com/wasm-csi/wasm-csi/puller/errdefs"
)

// Keyring is the registry credentials of one source (a pod's pull secret,
// the node's Docker config), matched to images the way kubelet matches a
// docker config: by host (with "*" globs per label, and the port when one
// is given) and by path prefix, most specific first. Its Name says where it
// came from, for messages; contents are never logged.
type Keyring struct {
	Name string
	// Node marks the node's own credentials (--docker-config, a credential
	// provider plugin): what they pull is the node's, not private to a pod.
	Node    bool
	entries []keyringEntry
}

type keyringEntry struct {
	host, port, path string
	cred             auth.Credential
}

// Credential is one credential to try, and the source it came from. The
// zero Credential is anonymous.
type Credential struct {
	Source string
	Cred   auth.Credential
	// Node marks the node's own credentials (--docker-config, a credential
	// provider plugin), as opposed to a pod's pull secret.
	Node bool
	// Err, when set, is a source that gave no credential because it failed
	// (a credential provider plugin that crashed, hung or printed garbage).
	// It is not presented to the registry; ResolveWith reports it if the
	// registry refuses every other credential.
	Err error
}

// Anonymous reports whether c carries no credential.
func (c Credential) Anonymous() bool { return c.Cred == auth.EmptyCredential }

// FromPodSecret reports whether c came from a pod's pull secret, rather
// than the node's credentials or no credential at all.
func (c Credential) FromPodSecret() bool { return !c.Anonymous() && !c.Node }

// CredentialProvider gives the node's credentials for an image from outside
// the driver: kubelet's credential provider plugins (package credprovider).
type CredentialProvider interface {
	// Provide returns the credentials for ref, in the order to try them.
	// A source that failed is returned as a Credential whose Err is set,
	// beside the credentials of the sources that did not.
	Provide(ctx context.Context, ref Reference) []Credential
}

type dockerAuth struct {
	Auth          string `json:"auth"`
	Username      string `json:"username"`
	Password      string `json:"password"`
	IdentityToken string `json:"identitytoken"`
	RegistryToken string `json:"registrytoken"`
}

// ParseDockerConfigJSON reads a config.json ({"auths": {...}}), as in a
// kubernetes.io/dockerconfigjson secret or the node's --docker-config.
func ParseDockerConfigJSON(name string, data []byte) (*Keyring, error) {
	var cfg struct {
		Auths map[string]dockerAuth `json:"auths"`
	}
	if err := json.Unmarshal(data, &cfg); err != nil {
		return nil, fmt.Errorf("%s is not a docker config.json: %w", name, errors.Unwrap(err))
	}
	return newKeyring(name, cfg.Auths)
}

// ParseDockerCfg reads the legacy .dockercfg format ({"host": {...}}), as
// in a kubernetes.io/dockercfg secret.
func ParseDockerCfg(name string, data []byte) (*Keyring, error) {
	var auths map[string]dockerAuth
	if err := json.Unmarshal(data, &auths); err != nil {
		return nil, fmt.Errorf("%s is not a .dockercfg: %w", name, errors.Unwrap(err))
	}
	return newKeyring(name, auths)
}

// LoadDockerConfigFile reads a config.json file; a missing file is an
// empty keyring.
func LoadDockerConfigFile(name, file string) (*Keyring, error) {
	data, err := os.ReadFile(file)
	if errors.Is(err, os.ErrNotExist) {
		return &Keyring{Name: name}, nil
	}
	if err != nil {
		return nil, err
	}
	return ParseDockerConfigJSON(name, data)
}

// NewKeyring returns a keyring of plain credentials keyed as in a docker
// config.json's "auths" (a credential provider plugin's answer, for one).
func NewKeyring(name string, node bool, creds map[string]auth.Credential) *Keyring {
	k := &Keyring{Name: name, Node: node}
	for key, cred := range creds {
		k.add(key, cred)
	}
	k.sort()
	return k
}

func (k *Keyring) add(key string, cred auth.Credential) {
	if cred == auth.EmptyCredential {
		return
	}
	host, port, p := parseAuthKey(key)
	if host == "" {
		return
	}
	k.entries = append(k.entries, keyringEntry{host: host, port: port, path: p, cred: cred})
}

func newKeyring(name string, auths map[string]dockerAuth) (*Keyring, error) {
	k := &Keyring{Name: name}
	for key, a := range auths {
		cred := auth.Credential{Username: a.Username, Password: a.Password, RefreshToken: a.IdentityToken, AccessToken: a.RegistryToken}
		if a.Auth != "" {
			raw, err := base64.StdEncoding.DecodeString(a.Auth)
			if err != nil {
				return nil, fmt.Errorf("%s: the auth of %q is not base64", name, key)
			}
			user, pass, ok := strings.Cut(string(raw), ":")
			if !ok {
				return nil, fmt.Errorf("%s: the auth of %q is not user:password", name, key)
			}
			cred.Username, cred.Password = user, pass
		}
		k.add(key, cred)
	}
	k.sort()
	return k, nil
}

// sort puts the most specific entries first: longer paths, then hosts
// without globs.
func (k *Keyring) sort() {
	sort.SliceStable(k.entries, func(i, j int) bool {
		a, b := k.entries[i], k.entries[j]
		if len(a.path) != len(b.path) {
			return len(a.path) > len(b.path)
		}
		return strings.Count(a.host, "*") < strings.Count(b.host, "*")
	})
}

// parseAuthKey splits a config key ("https://index.docker.io/v1/",
// "ghcr.io", "registry:5000/team", "*.example.com") into host, port, path.
func parseAuthKey(key string) (host, port, p string) {
	key = strings.TrimSpace(key)
	if !strings.Contains(key, "://") {
		key = "https://" + key
	}
	u, err := url.Parse(key)
	if err != nil {
		return "", "", ""
	}
	host, port = u.Hostname(), u.Port()
	p = strings.Trim(u.Path, "/")
	switch host {
	case "index.docker.io", "registry-1.docker.io", "docker.io":
		host, p = "docker.io", strings.TrimPrefix(strings.TrimPrefix(p, "v1"), "/")
	}
	return strings.ToLower(host), port, p
}

// Lookup returns the credentials that match ref, most specific first.
func (k *Keyring) Lookup(ref Reference) []Credential {
	if k == nil {
		return nil
	}
	host, port := ref.Registry, ""
	if h, pt, err := net.SplitHostPort(ref.Registry); err == nil {
		host, port = h, pt
	}
	host = strings.ToLower(host)
	var out []Credential
	for _, e := range k.entries {
		if e.port != "" && e.port != port {
			continue
		}
		if !globHostMatch(e.host, host) {
			continue
		}
		if e.path != "" && ref.Repository != e.path && !strings.HasPrefix(ref.Repository, e.path+"/") {
			continue
		}
		out = append(out, Credential{Source: k.Name, Cred: e.cred, Node: k.Node})
	}
	return out
}

// globHostMatch matches host against a pattern whose labels may be "*",
// label by label, as kubelet does.
func globHostMatch(pattern, host string) bool {
	pl, hl := strings.Split(pattern, "."), strings.Split(host, ".")
	if len(pl) != len(hl) {
		return false
	}
	for i := range pl {
		if ok, _ := path.Match(pl[i], hl[i]); !ok {
			return false
		}
	}
	return true
}

// Attempts lists the credentials to try for ref, in kubelet's order: every
// match of each keyring (a pod's pull secrets) in order, then the node's
// credential provider plugins, then the node's --docker-config. With no
// credential at all, the registry is tried anonymously.
func (p *Puller) Attempts(ctx context.Context, ref Reference, keyrings ...*Keyring) ([]Credential, error) {
	var out []Credential
	for _, k := range keyrings {
		out = append(out, k.Lookup(ref)...)
	}
	if p.cfg.CredentialProvider != nil {
		out = append(out, p.cfg.CredentialProvider.Provide(ctx, ref)...)
	}
	if p.cfg.DockerConfig != "" {
		node, err := LoadDockerConfigFile(nodeSource, p.cfg.DockerConfig)
		if err != nil {
			return nil, errdefs.New(errdefs.ErrUnauthorized, ref.Original, err, "cannot read the node's --docker-config")
		}
		node.Node = true
		out = append(out, node.Lookup(ref)...)
	}
	usable := false
	for _, c := range out {
		usable = usable || c.Err == nil
	}
	if !usable {
		out = append(out, Credential{Source: "anonymous"})
	}
	return out, nil
}
