package puller

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"strings"
	"sync"
	"syscall"

	"github.com/wasm-csi/wasm-csi/puller/hostsconf"
)

// The driver runs privileged on every node and pulls whatever reference a
// pod names, so a reference must not make it a request forger: it never
// dials loopback, link-local or cloud-metadata addresses, nor the networks
// of registries.blockedCIDRs, unless the operator named the host (see
// addressPolicy.named). The check is made in the dialer, on the address
// actually dialed after name resolution, so DNS names that resolve to such
// addresses, redirects (to blob storage or elsewhere) and bearer token
// realms, which oras-go fetches through the same http.Client, all meet it.

// blockRule is a network never dialed, and why, for messages.
type blockRule struct {
	prefix     netip.Prefix
	why        string
	configured bool // from registries.blockedCIDRs
}

// defaultBlocked are always blocked for hosts the operator did not name.
// The metadata addresses come before the ranges that hold them, so a
// message names the more telling rule.
var defaultBlocked = []blockRule{
	{prefix: netip.MustParsePrefix("169.254.169.254/32"), why: "a cloud metadata address"},
	{prefix: netip.MustParsePrefix("fd00:ec2::254/128"), why: "a cloud metadata address (AWS IPv6)"},
	{prefix: netip.MustParsePrefix("100.100.100.200/32"), why: "a cloud metadata address (Alibaba Cloud)"},
	{prefix: netip.MustParsePrefix("127.0.0.0/8"), why: "loopback"},
	{prefix: netip.MustParsePrefix("::1/128"), why: "loopback"},
	{prefix: netip.MustParsePrefix("169.254.0.0/16"), why: "link-local"},
	{prefix: netip.MustParsePrefix("fe80::/10"), why: "link-local"},
	// Dialing 0.0.0.0 or :: reaches this host.
	{prefix: netip.MustParsePrefix("0.0.0.0/8"), why: "this host (unspecified)"},
	{prefix: netip.MustParsePrefix("::/128"), why: "this host (unspecified)"},
}

// nat64 is the well-known NAT64 prefix: its addresses carry an IPv4
// address, checked as that address.
var nat64 = netip.MustParsePrefix("64:ff9b::/96")

// addressPolicy decides which addresses the puller may dial.
type addressPolicy struct {
	// named are the hosts the operator named (--insecure-registry,
	// registries.insecure, mirrors): "host:port" names that port, "host"
	// every port. They are dialed whatever they resolve to.
	named map[string]bool
	// runtime names more hosts, as its files say now.
	runtime *hostsconf.Resolver
	rules   []blockRule
	// proxies are the HTTP proxies of the environment seen so far: the
	// operator's, dialed as they are.
	proxies sync.Map
}

func newAddressPolicy(cfg Config) *addressPolicy {
	p := &addressPolicy{named: map[string]bool{}, runtime: cfg.Runtime, rules: append([]blockRule(nil), defaultBlocked...)}
	name := func(h string) {
		if host, port, err := net.SplitHostPort(h); err == nil {
			p.named[strings.ToLower(host)+"|"+port] = true
			return
		}
		p.named[strings.ToLower(strings.Trim(h, "[]"))+"|"] = true
	}
	for _, h := range cfg.InsecureRegistries {
		name(h)
	}
	for _, ms := range cfg.Mirrors {
		for _, m := range ms {
			name(m)
		}
	}
	for _, c := range cfg.BlockedCIDRs {
		p.rules = append(p.rules, blockRule{prefix: c.Masked(), why: "in registries.blockedCIDRs", configured: true})
	}
	return p
}

// isNamed reports whether hostport ("host:port", as dialed) was named by
// the operator.
func (p *addressPolicy) isNamed(hostport string) bool {
	host, port, err := net.SplitHostPort(hostport)
	if err != nil {
		host = hostport
	}
	host = strings.ToLower(host)
	return p.named[host+"|"] || (port != "" && p.named[host+"|"+port]) || p.runtime.Names(hostport)
}

// check returns a *blockedError when dialing ip for hostport is refused.
func (p *addressPolicy) check(hostport string, ip netip.Addr) error {
	ip = ip.Unmap().WithZone("")
	candidates := []netip.Addr{ip}
	if nat64.Contains(ip) {
		b := ip.As16()
		candidates = append(candidates, netip.AddrFrom4([4]byte(b[12:16])))
	}
	for _, a := range candidates {
		for _, r := range p.rules {
			if r.prefix.Contains(a) {
				return &blockedError{host: hostport, addr: ip, rule: r}
			}
		}
	}
	return nil
}

// dialContext wraps d so that every address it connects to, after name
// resolution, passes check, unless the host was named.
func (p *addressPolicy) dialContext(d *net.Dialer) func(context.Context, string, string) (net.Conn, error) {
	return func(ctx context.Context, network, addr string) (net.Conn, error) {
		if p.isNamed(addr) {
			return d.DialContext(ctx, network, addr)
		}
		if _, ok := p.proxies.Load(strings.ToLower(addr)); ok {
			return d.DialContext(ctx, network, addr)
		}
		guarded := *d
		guarded.ControlContext = func(_ context.Context, _, address string, _ syscall.RawConn) error {
			ap, err := netip.ParseAddrPort(address)
			if err != nil {
				return fmt.Errorf("dialing %s: unexpected address %q", addr, address)
			}
			return p.check(addr, ap.Addr())
		}
		return guarded.DialContext(ctx, network, addr)
	}
}

// proxy wraps http.ProxyFromEnvironment. Through a proxy, the proxy
// resolves and dials the registry, so its name is resolved here and
// checked as well as it can be; the proxy itself is the operator's and is
// dialed as it is.
func (p *addressPolicy) proxy(req *http.Request) (*url.URL, error) {
	u, err := http.ProxyFromEnvironment(req)
	if u == nil || err != nil {
		return u, err
	}
	target := canonicalAddr(req.URL)
	if !p.isNamed(target) {
		host := req.URL.Hostname()
		var ips []netip.Addr
		if ip, perr := netip.ParseAddr(host); perr == nil {
			ips = []netip.Addr{ip}
		} else if found, lerr := net.DefaultResolver.LookupNetIP(req.Context(), "ip", host); lerr == nil {
			ips = found
		}
		for _, ip := range ips {
			if err := p.check(target, ip); err != nil {
				return nil, err
			}
		}
	}
	p.proxies.Store(strings.ToLower(canonicalAddr(u)), true)
	return u, nil
}

// canonicalAddr is u's host:port, with the scheme's default port.
func canonicalAddr(u *url.URL) string {
	port := u.Port()
	if port == "" {
		switch u.Scheme {
		case "http":
			port = "80"
		case "socks5", "socks5h":
			port = "1080"
		default:
			port = "443"
		}
	}
	return net.JoinHostPort(u.Hostname(), port)
}

// blockedError is a refused dial: the host:port dialed, the address it
// resolved to and the rule that refused it.
type blockedError struct {
	host string
	addr netip.Addr
	rule blockRule
}

func (e *blockedError) Error() string {
	return fmt.Sprintf("%s resolves to %s, %s", e.host, e.addr, e.ruleText())
}

func (e *blockedError) ruleText() string {
	if e.rule.configured {
		return fmt.Sprintf("in %s of registries.blockedCIDRs", e.rule.prefix)
	}
	return fmt.Sprintf("in %s, %s", e.rule.prefix, e.rule.why)
}

// blockedMessage explains a refused dial for ref and says how to allow it.
func blockedMessage(ref Reference, e *blockedError, doing string) string {
	host, _, err := net.SplitHostPort(e.host)
	if err != nil {
		host = e.host
	}
	// The registry itself is named as the reference names it (naming it
	// also means plain HTTP, so its port may change); a host it sent the
	// puller to (a redirect, a token realm) as dialed.
	name, via := e.host, ""
	_, _, noPort := net.SplitHostPort(ref.Registry)
	if strings.EqualFold(e.host, ref.Registry) || (noPort != nil && strings.EqualFold(host, ref.Registry)) {
		name = ref.Registry
	} else {
		via = fmt.Sprintf(", reached from registry %s,", ref.Registry)
	}
	verb := "resolves to"
	if ip, err := netip.ParseAddr(strings.Trim(host, "[]")); err == nil && ip.Unmap() == e.addr {
		verb = "is"
	}
	allow := fmt.Sprintf("name %s with --insecure-registry or in registries.insecure (a named host is reached over plain HTTP)", name)
	if e.rule.configured {
		allow = fmt.Sprintf("remove %s from registries.blockedCIDRs, or %s", e.rule.prefix, allow)
	}
	return fmt.Sprintf("%s: blocked address: %s%s %s %s (%s), which the driver never dials for a pod's image; if the node is meant to pull from it, %s",
		doing, e.host, via, verb, e.addr, e.ruleText(), allow)
}

// isBlocked reports whether err is a refused dial.
func isBlocked(err error) bool {
	var be *blockedError
	return errors.As(err, &be)
}
