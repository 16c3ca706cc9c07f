package puller

import (
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"net/http"
	"sort"
	"strings"
	"sync"
	"sync/atomic"

	"github.com/wasm-csi/wasm-csi/puller/errdefs"
	"github.com/wasm-csi/wasm-csi/puller/hostsconf"
)

// Sources lists where ref can be pulled from, in the order tried: the
// config file's registries.mirrors, then the runtime's (hosts.toml hosts in
// file order, registries.conf mirrors), then the registry itself, or the
// server or location the runtime's configuration puts in its place. Each is
// the same image on another host, and perhaps another repository path. A
// registry that registries.conf blocks is errdefs.ErrRegistryBlocked.
func (p *Puller) Sources(ref Reference) ([]Reference, error) {
	var out []Reference
	for _, m := range p.cfg.Mirrors[ref.Registry] {
		alt := ref
		alt.Registry = m
		alt.Endpoint = nil
		out = append(out, alt)
	}
	if p.cfg.Runtime == nil {
		return append(out, ref), nil
	}
	eps, err := p.cfg.Runtime.Endpoints(ref.Registry, ref.Repository, ref.Tag, ref.Digest.String())
	if err != nil {
		if errors.Is(err, errdefs.ErrRegistryBlocked) {
			return nil, errdefs.New(errdefs.ErrRegistryBlocked, ref.Original, err, "the node's container runtime configuration blocks %s; pulls from it are refused as the runtime refuses them", ref.Registry)
		}
		return nil, errdefs.New(errdefs.ErrUnavailable, ref.Original, err, "cannot apply the runtime's registry configuration")
	}
	for _, ep := range eps {
		alt := ref
		alt.Registry, alt.Repository = ep.Registry, ep.Repository
		if ep.Origin != "" {
			e := ep
			alt.Endpoint = &e
		}
		out = append(out, alt)
	}
	return out, nil
}

// CanResolve reports whether the source may turn a tag into a digest
// (hosts.toml capability "resolve"; every other source may).
func (r Reference) CanResolve() bool { return r.Endpoint == nil || r.Endpoint.Resolve }

// CanPull reports whether the source may serve manifests and blobs by
// digest (hosts.toml capability "pull"; every other source may).
func (r Reference) CanPull() bool { return r.Endpoint == nil || r.Endpoint.Pull }

// IsMirror reports whether the source is a mirror rather than the registry
// itself.
func (r Reference) IsMirror(of Reference) bool {
	if r.Endpoint != nil {
		return r.Endpoint.Mirror
	}
	return r.Registry != of.Registry
}

// endpointClients are the HTTP clients of runtime-configured endpoints that
// need their own TLS settings, headers, API root or HTTP fallback, keyed by
// those settings.
type endpointClients struct {
	mu sync.Mutex
	m  map[string]*http.Client
}

// maxEndpointClients bounds the clients kept: settings change only when the
// runtime's files do.
const maxEndpointClients = 256

// clientFor returns the client for ep (nil: the puller's own will do).
func (p *Puller) clientFor(ep *hostsconf.Endpoint) (*http.Client, error) {
	if ep == nil || (!ep.SkipVerify && !ep.Insecure && len(ep.RootCAs) == 0 && len(ep.Header) == 0 && ep.Root == "/v2") {
		return nil, nil
	}
	key := endpointKey(ep)
	p.endpoints.mu.Lock()
	defer p.endpoints.mu.Unlock()
	if c, ok := p.endpoints.m[key]; ok {
		return c, nil
	}
	base := p.cfg.Transport
	if t, ok := base.(*http.Transport); ok && (ep.SkipVerify || ep.Insecure || len(ep.RootCAs) > 0) {
		t = t.Clone()
		tc := &tls.Config{MinVersion: tls.VersionTLS12}
		if t.TLSClientConfig != nil {
			tc = t.TLSClientConfig.Clone()
		}
		if len(ep.RootCAs) > 0 {
			pool, err := x509.SystemCertPool()
			if err != nil || pool == nil {
				pool = x509.NewCertPool()
			}
			if !pool.AppendCertsFromPEM(ep.RootCAs) {
				return nil, fmt.Errorf("%s: no certificate in the ca of %s", ep.Registry, ep.Origin)
			}
			tc.RootCAs = pool
		}
		// hosts.toml skip_verify, registries.conf insecure: the operator
		// asked for no certificate checks on this host.
		tc.InsecureSkipVerify = ep.SkipVerify || ep.Insecure // #nosec G402 -- operator's setting
		t.TLSClientConfig = tc
		base = t
	}
	rt := http.RoundTripper(&endpointTransport{base: base, ep: *ep})
	c := &http.Client{Transport: &idleTransport{base: &retryTransport{base: rt, budget: p.cfg.RetryBudget}, idle: p.cfg.IdleTimeout}}
	if p.endpoints.m == nil || len(p.endpoints.m) >= maxEndpointClients {
		p.endpoints.m = map[string]*http.Client{}
	}
	p.endpoints.m[key] = c
	return c, nil
}

// CloseIdleConnections closes the idle connections of the transport
// under t.
func (t *endpointTransport) CloseIdleConnections() { closeIdle(t.base) }

// CloseIdleConnections closes the registry connections kept open for
// reuse, the puller's own and those of each mirror with settings of its
// own: each is two goroutines and its buffers. The daemon calls it when a
// burst of pulls is over; the next pull dials again.
func (p *Puller) CloseIdleConnections() {
	p.client.CloseIdleConnections()
	p.endpoints.mu.Lock()
	defer p.endpoints.mu.Unlock()
	for _, c := range p.endpoints.m {
		c.CloseIdleConnections()
	}
}

func endpointKey(ep *hostsconf.Endpoint) string {
	h := sha256.New()
	fmt.Fprintf(h, "%s|%s|%t|%t|%s|", ep.Registry, ep.Scheme, ep.Insecure, ep.SkipVerify, ep.Root)
	h.Write(ep.RootCAs)
	keys := make([]string, 0, len(ep.Header))
	for k := range ep.Header {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		fmt.Fprintf(h, "|%s=%q", k, ep.Header[k])
	}
	return fmt.Sprintf("%x", h.Sum(nil))
}

// endpointTransport applies an endpoint's settings to the requests sent to
// its host: its headers, its API root in place of /v2 (override_path or a
// server path), and for registries.conf's insecure, plain HTTP when the
// host does not speak TLS. Requests to other hosts (token realms, blob
// storage redirects) pass as they are.
type endpointTransport struct {
	base http.RoundTripper
	ep   hostsconf.Endpoint
	// plain is set once an insecure host has answered TLS in plain HTTP.
	plain atomic.Bool
}

func (t *endpointTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	if !sameHost(req.URL.Host, req.URL.Scheme, t.ep.Registry) {
		return t.base.RoundTrip(req)
	}
	req = req.Clone(req.Context())
	for k, vs := range t.ep.Header {
		if req.Header.Get(k) == "" {
			for _, v := range vs {
				req.Header.Add(k, v)
			}
		}
	}
	if t.ep.Root != "/v2" {
		if rest, ok := strings.CutPrefix(req.URL.Path, "/v2"); ok && (rest == "" || strings.HasPrefix(rest, "/")) {
			req.URL.Path = strings.TrimSuffix(t.ep.Root, "/") + rest
			req.URL.RawPath = ""
		}
	}
	if t.ep.Insecure && t.plain.Load() && req.URL.Scheme == "https" {
		req.URL.Scheme = "http"
	}
	resp, err := t.base.RoundTrip(req)
	if err != nil && t.ep.Insecure && req.URL.Scheme == "https" && speaksPlainHTTP(err) &&
		(req.Method == http.MethodGet || req.Method == http.MethodHead) {
		t.plain.Store(true)
		plain := req.Clone(req.Context())
		plain.URL.Scheme = "http"
		return t.base.RoundTrip(plain)
	}
	return resp, err
}

// speaksPlainHTTP reports whether a TLS handshake failed because the server
// answered in plain HTTP.
func speaksPlainHTTP(err error) bool {
	var rh tls.RecordHeaderError
	if errors.As(err, &rh) {
		return true
	}
	return strings.Contains(err.Error(), "server gave HTTP response to HTTPS client")
}

// sameHost reports whether a request's host (as in its URL) is the
// endpoint's host[:port], the scheme's default port standing for none.
func sameHost(urlHost, scheme, registry string) bool {
	if strings.EqualFold(urlHost, registry) {
		return true
	}
	h1, p1, err1 := net.SplitHostPort(urlHost)
	h2, p2, err2 := net.SplitHostPort(registry)
	if err1 != nil {
		h1, p1 = urlHost, ""
	}
	if err2 != nil {
		h2, p2 = registry, ""
	}
	def := "443"
	if scheme == "http" {
		def = "80"
	}
	if p1 == "" {
		p1 = def
	}
	if p2 == "" {
		p2 = def
	}
	return strings.EqualFold(h1, h2) && p1 == p2
}
