package puller

import (
	"errors"
	"net/netip"
	"strings"
	"testing"

	"github.com/wasm-csi/wasm-csi/puller/errdefs"
)

// TestAddressPolicy checks which addresses are refused, with which rule,
// and that a host the operator named is dialed whatever it resolves to.
func TestAddressPolicy(t *testing.T) {
	p := newAddressPolicy(Config{
		InsecureRegistries: []string{"127.0.0.1:5000", "registry.local", "[::1]:5001"},
		Mirrors:            map[string][]string{"ghcr.io": {"mirror.internal:8443"}},
		BlockedCIDRs:       []netip.Prefix{netip.MustParsePrefix("10.0.0.0/8"), netip.MustParsePrefix("fd12:3456::1/32")},
	})
	tests := []struct {
		addr    string
		blocked string // the rule's text, or "" when allowed
	}{
		{"127.0.0.1", "127.0.0.0/8, loopback"},
		{"127.9.9.9", "127.0.0.0/8, loopback"},
		{"::1", "::1/128, loopback"},
		{"::ffff:127.0.0.1", "127.0.0.0/8, loopback"},
		{"169.254.169.254", "169.254.169.254/32, a cloud metadata address"},
		{"169.254.10.1", "169.254.0.0/16, link-local"},
		{"fe80::1", "fe80::/10, link-local"},
		{"fe80::1%eth0", "fe80::/10, link-local"},
		{"fd00:ec2::254", "fd00:ec2::254/128, a cloud metadata address (AWS IPv6)"},
		{"100.100.100.200", "100.100.100.200/32, a cloud metadata address (Alibaba Cloud)"},
		{"0.0.0.0", "0.0.0.0/8, this host"},
		{"::", "::/128, this host"},
		{"64:ff9b::a9fe:a9fe", "169.254.169.254/32"}, // NAT64 of the metadata address
		{"10.1.2.3", "10.0.0.0/8 of registries.blockedCIDRs"},
		{"fd12:3456:ffff::1", "fd12:3456::/32 of registries.blockedCIDRs"},
		{"192.0.2.10", ""},
		{"100.100.100.201", ""},
		{"8.8.8.8", ""},
		{"2001:db8::1", ""},
		{"fd00:ec2::253", ""},
	}
	for _, tt := range tests {
		err := p.check("registry.example:443", netip.MustParseAddr(tt.addr))
		if tt.blocked == "" {
			if err != nil {
				t.Errorf("%s: refused (%v), want allowed", tt.addr, err)
			}
			continue
		}
		var be *blockedError
		if !errors.As(err, &be) {
			t.Errorf("%s: %v, want refused by %q", tt.addr, err, tt.blocked)
			continue
		}
		if !strings.Contains(be.Error(), tt.blocked) || !strings.Contains(be.Error(), "registry.example:443") {
			t.Errorf("%s: %q does not name the host and the rule %q", tt.addr, be.Error(), tt.blocked)
		}
	}

	named := map[string]bool{
		"127.0.0.1:5000":       true,
		"127.0.0.1:5001":       false, // another port of a HOST:PORT entry
		"registry.local:443":   true,  // a HOST entry names every port
		"REGISTRY.local:80":    true,
		"[::1]:5001":           true,
		"[::1]:5000":           false,
		"mirror.internal:8443": true, // mirrors are the operator's too
		"mirror.internal:443":  false,
		"ghcr.io:443":          false, // a mirrored registry is not named
		"localhost:5000":       false, // names are compared, not addresses
		"169.254.169.254:80":   false,
	}
	for addr, want := range named {
		if got := p.isNamed(addr); got != want {
			t.Errorf("isNamed(%s) = %v, want %v", addr, got, want)
		}
	}
}

// TestBlockedMessage checks the message names the host, the address, the
// rule and how to allow it.
func TestBlockedMessage(t *testing.T) {
	ref, err := ParseReference("registry.example/acme/filter:1.0")
	if err != nil {
		t.Fatal(err)
	}
	p := newAddressPolicy(Config{BlockedCIDRs: []netip.Prefix{netip.MustParsePrefix("10.0.0.0/8")}})
	var be *blockedError
	errors.As(p.check("registry.example:443", netip.MustParseAddr("169.254.169.254")), &be)
	msg := classify(ref, be, "resolving 1.0").Error()
	for _, s := range []string{"registry.example/acme/filter:1.0", "blocked address", "registry.example:443", "169.254.169.254",
		"cloud metadata", "--insecure-registry", "registries.insecure"} {
		if !strings.Contains(msg, s) {
			t.Errorf("message %q does not say %q", msg, s)
		}
	}
	if !errors.Is(classify(ref, be, "x"), errdefs.ErrBlockedAddress) {
		t.Error("classify of a refused dial is not errdefs.ErrBlockedAddress")
	}
	// A configured rule says it can be removed; a redirect names where from.
	errors.As(p.check("blobs.example:443", netip.MustParseAddr("10.0.0.7")), &be)
	msg = classify(ref, be, "fetching layer").Error()
	for _, s := range []string{"blobs.example:443", "reached from registry registry.example", "10.0.0.7",
		"remove 10.0.0.0/8 from registries.blockedCIDRs"} {
		if !strings.Contains(msg, s) {
			t.Errorf("message %q does not say %q", msg, s)
		}
	}
}
