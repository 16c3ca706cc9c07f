// Package hostsconf reads the container runtime's registry configuration
// from the host, containerd's <certs.d>/<host>/hosts.toml and CRI-O's and
// podman's registries.conf (v2, with its registries.conf.d drop-ins), and
// turns an image's registry and repository into the ordered endpoints the
// runtime would try: its mirrors, then the registry itself (or what the
// configuration puts in its place).
//
// It owns parsing, the last good version of each file, and re-reading them
// when they change. It dials nothing and knows nothing of credentials, the
// driver's own config file or the address guard: the puller does.
package hostsconf

import (
	"net/http"
	"strings"
)

// Endpoint is one place an image can be fetched from.
type Endpoint struct {
	// Registry is the host[:port] dialed.
	Registry string
	// Repository is the repository's path on this endpoint (registries.conf
	// may rewrite it); empty means the image's own.
	Repository string
	// Scheme is "https" or "http" (a plain-HTTP host, as containerd
	// allows with an http:// host).
	Scheme string
	// Insecure is registries.conf's insecure: HTTPS without certificate
	// checks first, then plain HTTP.
	Insecure bool
	// Root is the path of the registry API ("/v2"; another with a server
	// path or override_path).
	Root string
	// SkipVerify turns off certificate checks (hosts.toml skip_verify).
	SkipVerify bool
	// RootCAs are PEM certificates trusted beside the system's (hosts.toml
	// ca), read when the file was.
	RootCAs []byte
	// Header is sent with every request to the endpoint.
	Header http.Header
	// Resolve: the endpoint may turn a tag into a digest. Pull: it may
	// serve manifests and blobs by digest.
	Resolve, Pull bool
	// Mirror is false for the registry itself (or the server or location
	// that stands for it).
	Mirror bool
	// Origin is the file that named the endpoint, for logs.
	Origin string
}

// Named reports whether e names hostport ("host" or "host:port"); an
// endpoint without a port is reached on its scheme's default port.
func (e Endpoint) names(hostport string) bool {
	if strings.EqualFold(e.Registry, hostport) {
		return true
	}
	host, port := splitHostPort(e.Registry)
	h2, p2 := splitHostPort(hostport)
	if !strings.EqualFold(host, h2) {
		return false
	}
	if port == "" {
		switch {
		case e.Insecure:
			port = p2 // both 443 and 80 may be dialed
		case e.Scheme == "http":
			port = "80"
		default:
			port = "443"
		}
	}
	return port == p2 || p2 == ""
}

func splitHostPort(hp string) (string, string) {
	if strings.HasPrefix(hp, "[") {
		if i := strings.Index(hp, "]"); i > 0 {
			return hp[1:i], strings.TrimPrefix(hp[i+1:], ":")
		}
	}
	if i := strings.LastIndex(hp, ":"); i >= 0 && strings.Count(hp, ":") == 1 {
		return hp[:i], hp[i+1:]
	}
	return hp, ""
}
