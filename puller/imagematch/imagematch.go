// Package imagematch matches image names against the operator's patterns:
// the config's registries.allowed and a verification policy's images.
//
// A pattern is HOST[:PORT][/PATH]. In HOST, a label that is exactly '*'
// stands for one DNS label (so "*.example.com" matches "a.example.com" but
// neither "example.com" nor "a.b.example.com"). A pattern without a port
// matches only registries named without one; with a port, only that port.
// PATH matches the repository equal to it or beginning with PATH/, so
// "ghcr.io/acme" matches ghcr.io/acme and ghcr.io/acme/x but never
// ghcr.io/acmecorp. Without PATH every repository of the host matches.
//
// The package matches names that are already normalised (the Registry and
// Repository of puller.ParseReference: "nginx" is registry "docker.io",
// repository "library/nginx"); it parses no image references itself and
// makes no network request. It owns no state and touches nothing outside
// its arguments.
//
// Written here rather than taken from kubelet's credential-provider
// matcher because the contract differs: kubelet matches a path as a plain
// string prefix ("ghcr.io/acme" would match "ghcr.io/acmecorp") and allows
// globs inside a label; this package does neither.
package imagematch

import (
	"errors"
	"fmt"
	"regexp"
	"strconv"
	"strings"
)

// ErrInvalidPattern is returned (wrapped, with the pattern and the reason)
// for a pattern that is not HOST[:PORT][/PATH].
var ErrInvalidPattern = errors.New("invalid image pattern")

// Pattern is one parsed HOST[:PORT][/PATH] pattern.
type Pattern struct {
	raw    string
	labels []string // lower-case host labels; "*" matches any one label
	ipv6   string   // bracketed IPv6 literal host, if any (no wildcards)
	port   string   // "" when the pattern has none
	path   string   // "" matches every repository
}

var (
	// A DNS label (RFC 1123, letters, digits and inner hyphens; underscores
	// are tolerated as some private registries use them).
	labelRe = regexp.MustCompile(`^[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?$`)
	// A repository path component, as in the distribution grammar.
	componentRe = regexp.MustCompile(`^[a-z0-9]+(?:(?:[._]|__|[-]+)[a-z0-9]+)*$`)
)

// dockerHubLegacy is the name Docker Hub once went by; references and
// patterns naming it mean docker.io, as in the distribution grammar.
const dockerHubLegacy = "index.docker.io"

// Parse parses one pattern. It rejects schemes, tags, digests, wildcards
// outside the host or inside a label, and empty or malformed parts, so a
// typo in the config fails when the config is read rather than matching
// nothing (or everything) at publish time.
func Parse(s string) (Pattern, error) {
	in := strings.TrimSpace(s)
	bad := func(why string) (Pattern, error) {
		return Pattern{}, fmt.Errorf("%w %q: %s; write HOST[:PORT][/PATH], for example ghcr.io/acme or registry.local:5000", ErrInvalidPattern, s, why)
	}
	if in == "" {
		return bad("empty")
	}
	if strings.Contains(in, "://") {
		return bad("no scheme (https://) is allowed")
	}
	if strings.ContainsAny(in, "@ \t") {
		return bad("a pattern names repositories, not a digest")
	}
	hostport, path, _ := strings.Cut(in, "/")
	path = strings.TrimRight(path, "/")
	p := Pattern{raw: in}

	host := hostport
	if strings.HasPrefix(hostport, "[") {
		end := strings.Index(hostport, "]")
		if end < 0 {
			return bad("unterminated [ in the host")
		}
		host, p.ipv6 = "", strings.ToLower(hostport[:end+1])
		if rest := hostport[end+1:]; rest != "" {
			if !strings.HasPrefix(rest, ":") {
				return bad("expected :PORT after the IPv6 address")
			}
			p.port = rest[1:]
			if p.port == "" {
				return bad("empty port")
			}
		}
		if strings.Contains(p.ipv6, "*") {
			return bad("'*' is not allowed in an IP address")
		}
	} else if h, port, ok := strings.Cut(hostport, ":"); ok {
		host, p.port = h, port
		if p.port == "" {
			return bad("empty port")
		}
	}
	if p.port != "" {
		n, err := strconv.Atoi(p.port)
		if err != nil || n < 1 || n > 65535 || strconv.Itoa(n) != p.port {
			return bad("the port must be a number from 1 to 65535 ('*' is allowed only as a host label)")
		}
	}
	if p.ipv6 == "" {
		host = strings.ToLower(host)
		if host == dockerHubLegacy {
			host = "docker.io"
		}
		if host == "" {
			return bad("empty host")
		}
		for _, l := range strings.Split(host, ".") {
			switch {
			case l == "*":
			case strings.Contains(l, "*"):
				return bad("'*' must stand for a whole DNS label, as in *.example.com")
			case !labelRe.MatchString(l):
				return bad(fmt.Sprintf("%q is not a DNS label", l))
			}
			p.labels = append(p.labels, l)
		}
	}
	if path != "" {
		if strings.Contains(path, "*") {
			return bad("'*' is allowed only as a host label; PATH already matches everything under it")
		}
		if strings.Contains(path, ":") {
			return bad("a pattern names repositories, not a tag")
		}
		for _, c := range strings.Split(path, "/") {
			if !componentRe.MatchString(c) {
				return bad(fmt.Sprintf("%q is not a repository path component (lower-case letters, digits and . _ -)", c))
			}
		}
		p.path = path
	}
	return p, nil
}

// String returns the pattern as written (trimmed).
func (p Pattern) String() string { return p.raw }

// Match reports whether the image registry/repository falls under the
// pattern. registry is host[:port] and repository the path, both as
// normalised by puller.ParseReference.
func (p Pattern) Match(registry, repository string) bool {
	host, port := splitHostPort(registry)
	if port != p.port {
		return false
	}
	if p.ipv6 != "" {
		if host != p.ipv6 {
			return false
		}
	} else {
		labels := strings.Split(host, ".")
		if len(labels) != len(p.labels) {
			return false
		}
		for i, l := range p.labels {
			if l != "*" && l != labels[i] {
				return false
			}
		}
	}
	return p.path == "" || repository == p.path || strings.HasPrefix(repository, p.path+"/")
}

// splitHostPort splits host[:port] (host may be a bracketed IPv6 literal),
// lower-cases the host and maps Docker Hub's legacy name to docker.io.
func splitHostPort(registry string) (host, port string) {
	host = registry
	if strings.HasPrefix(registry, "[") {
		if end := strings.Index(registry, "]"); end >= 0 {
			host = registry[:end+1]
			port = strings.TrimPrefix(registry[end+1:], ":")
		}
	} else if h, p, ok := strings.Cut(registry, ":"); ok {
		host, port = h, p
	}
	host = strings.ToLower(host)
	if host == dockerHubLegacy {
		host = "docker.io"
	}
	return host, port
}

// List is an ordered list of patterns.
type List []Pattern

// ParseList parses every pattern; the error names each bad one with its
// position (patterns[i]) so an operator can find it in the config.
func ParseList(patterns []string) (List, error) {
	l := make(List, 0, len(patterns))
	var errs []error
	for i, s := range patterns {
		p, err := Parse(s)
		if err != nil {
			errs = append(errs, fmt.Errorf("[%d]: %w", i, err))
			continue
		}
		l = append(l, p)
	}
	if len(errs) > 0 {
		return nil, errors.Join(errs...)
	}
	return l, nil
}

// Match returns the first pattern of the list that registry/repository
// falls under, and whether there was one. An empty list matches nothing.
func (l List) Match(registry, repository string) (Pattern, bool) {
	for _, p := range l {
		if p.Match(registry, repository) {
			return p, true
		}
	}
	return Pattern{}, false
}

// Strings returns the patterns as written, for messages and logs.
func (l List) Strings() []string {
	out := make([]string, len(l))
	for i, p := range l {
		out[i] = p.raw
	}
	return out
}
