package csi

import (
	"strings"
	"testing"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/opencontainers/go-digest"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/wasm-csi/wasm-csi/node"
	"github.com/wasm-csi/wasm-csi/node/store"
)

const (
	testTarget = "/var/lib/kubelet/pods/uid-1/volumes/kubernetes.io~csi/filter/mount"
	hex64      = "3f1c0000000000000000000000000000000000000000000000000000000000ab"
)

func mountCap() *csipb.VolumeCapability {
	return &csipb.VolumeCapability{
		AccessType: &csipb.VolumeCapability_Mount{Mount: &csipb.VolumeCapability_MountVolume{}},
		AccessMode: &csipb.VolumeCapability_AccessMode{Mode: csipb.VolumeCapability_AccessMode_SINGLE_NODE_READER_ONLY},
	}
}

// publishReq is a valid request with attrs as its volume context.
func publishReq(attrs map[string]string) *csipb.NodePublishVolumeRequest {
	return &csipb.NodePublishVolumeRequest{
		VolumeId:         "csi-0123",
		TargetPath:       testTarget,
		VolumeCapability: mountCap(),
		Readonly:         true,
		VolumeContext:    attrs,
	}
}

func withImage(kv ...string) map[string]string {
	m := map[string]string{AttrImage: "ghcr.io/acme/filters/header:1.2.0", attrEphemeral: "true"}
	for i := 0; i+1 < len(kv); i += 2 {
		m[kv[i]] = kv[i+1]
	}
	return m
}

func TestParsePublishRequestRequest(t *testing.T) {
	tests := []struct {
		name   string
		mutate func(r *csipb.NodePublishVolumeRequest)
		want   string // substring of the InvalidArgument message
	}{
		{"no volume id", func(r *csipb.NodePublishVolumeRequest) { r.VolumeId = "" }, "volume_id is required"},
		{"no target", func(r *csipb.NodePublishVolumeRequest) { r.TargetPath = "" }, "target_path is required"},
		{"relative target", func(r *csipb.NodePublishVolumeRequest) { r.TargetPath = "pods/x/mount" }, `target_path "pods/x/mount" is not absolute`},
		{"no capability", func(r *csipb.NodePublishVolumeRequest) { r.VolumeCapability = nil }, "volume_capability is required"},
		{"block capability", func(r *csipb.NodePublishVolumeRequest) {
			r.VolumeCapability.AccessType = &csipb.VolumeCapability_Block{Block: &csipb.VolumeCapability_BlockVolume{}}
		}, "only mount volumes are supported"},
		{"capability without access type", func(r *csipb.NodePublishVolumeRequest) { r.VolumeCapability.AccessType = nil }, "only mount volumes are supported"},
		{"no volume context", func(r *csipb.NodePublishVolumeRequest) { r.VolumeContext = nil }, `volume attribute "image" is required`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := publishReq(withImage())
			tt.mutate(r)
			req, err := ParsePublishRequest(r)
			assertInvalid(t, req, err, tt.want)
		})
	}
}

func assertInvalid(t *testing.T, req node.PublishRequest, err error, want ...string) {
	t.Helper()
	if err == nil {
		t.Fatalf("ParsePublishRequest = %+v, want InvalidArgument", req)
	}
	st, ok := status.FromError(err)
	if !ok || st.Code() != codes.InvalidArgument {
		t.Fatalf("error %v (code %v), want InvalidArgument", err, status.Code(err))
	}
	for _, w := range want {
		if !strings.Contains(st.Message(), w) {
			t.Errorf("message %q does not contain %q", st.Message(), w)
		}
	}
	if req.VolumeID != "" || req.Image.Registry != "" {
		t.Errorf("a refused request returned %+v", req)
	}
}

func TestParsePublishRequestValid(t *testing.T) {
	r := publishReq(withImage(
		AttrPullPolicy, "Never",
		AttrSHA256, hex64,
		AttrFileName, "header.wasm",
		attrPodName, "gateway-7d9f",
		attrPodNamespace, "istio-ingress",
		attrPodUID, "0b5c-11",
		attrServiceAccount, "gateway-sa",
	))
	r.TargetPath = "/var/lib/kubelet/pods/uid-1/volumes/../volumes/kubernetes.io~csi/filter/mount/"
	r.Readonly = false // the mount is read-only whatever readOnly says
	req, err := ParsePublishRequest(r)
	if err != nil {
		t.Fatal(err)
	}
	want := node.PublishRequest{
		VolumeID:   "csi-0123",
		TargetPath: testTarget,
		PullPolicy: node.PullNever,
		SHA256:     digest.Digest("sha256:" + hex64),
		FileName:   "header.wasm",
		Pod:        node.PodInfo{Name: "gateway-7d9f", Namespace: "istio-ingress", UID: "0b5c-11", ServiceAccount: "gateway-sa"},
	}
	img := req.Image
	req.Image = want.Image
	if req != want {
		t.Errorf("ParsePublishRequest =\n %+v\nwant\n %+v", req, want)
	}
	if img.String() != "ghcr.io/acme/filters/header:1.2.0" || img.Original != "ghcr.io/acme/filters/header:1.2.0" {
		t.Errorf("Image = %+v", img)
	}

	// Only image given: the defaults.
	req, err = ParsePublishRequest(publishReq(map[string]string{AttrImage: "oci://ghcr.io/acme/x:1"}))
	if err != nil {
		t.Fatal(err)
	}
	if req.FileName != "plugin.wasm" || req.PullPolicy != node.PullIfNotPresent || req.SHA256 != "" || req.Pod != (node.PodInfo{}) ||
		req.Image.String() != "ghcr.io/acme/x:1" || req.Image.Original != "oci://ghcr.io/acme/x:1" || req.TargetPath != testTarget {
		t.Errorf("defaults: %+v", req)
	}
}

func TestParsePublishRequestImage(t *testing.T) {
	for _, tt := range []struct {
		name  string
		attrs map[string]string
		want  []string
	}{
		{"missing", map[string]string{attrPodName: "p"}, []string{`volume attribute "image" is required`}},
		{"empty", map[string]string{AttrImage: ""}, []string{`volume attribute "image" is required`}},
		{"blank", map[string]string{AttrImage: "  \t "}, []string{`volume attribute "image" is required`}},
		{"upper case", map[string]string{AttrImage: "ghcr.io/Acme/X:1"}, []string{"image ghcr.io/Acme/X:1:", "cannot parse"}},
		{"two colons", map[string]string{AttrImage: "a:b:c"}, []string{"image a:b:c:", "cannot parse"}},
		{"bad digest", map[string]string{AttrImage: "ghcr.io/acme/x@sha256:1234"}, []string{"image ghcr.io/acme/x@sha256:1234:"}},
		{"oci prefix only", map[string]string{AttrImage: "oci://"}, []string{"image oci://:", "empty reference"}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			req, err := ParsePublishRequest(publishReq(tt.attrs))
			assertInvalid(t, req, err, tt.want...)
		})
	}
}

func TestParsePublishRequestPullPolicy(t *testing.T) {
	for _, tt := range []struct {
		image, policy string
		want          node.PullPolicy
	}{
		{"ghcr.io/acme/x:1.0", "", node.PullIfNotPresent},
		{"ghcr.io/acme/x:latest", "", node.PullAlways},
		{"ghcr.io/acme/x", "", node.PullAlways},
		{"busybox", "", node.PullAlways},
		{"ghcr.io/acme/x@sha256:" + hex64, "", node.PullIfNotPresent},
		{"ghcr.io/acme/x:latest@sha256:" + hex64, "", node.PullIfNotPresent},
		{"ghcr.io/acme/x:1.0", "Always", node.PullAlways},
		{"ghcr.io/acme/x:1.0", "Never", node.PullNever},
		{"ghcr.io/acme/x:1.0", "IfNotPresent", node.PullIfNotPresent},
		{"ghcr.io/acme/x:latest", "IfNotPresent", node.PullIfNotPresent},
		{"ghcr.io/acme/x", "Never", node.PullNever},
		{"ghcr.io/acme/x@sha256:" + hex64, "Always", node.PullAlways},
	} {
		t.Run(tt.image+"/"+tt.policy, func(t *testing.T) {
			attrs := withImage(AttrImage, tt.image)
			if tt.policy != "" {
				attrs[AttrPullPolicy] = tt.policy
			}
			req, err := ParsePublishRequest(publishReq(attrs))
			if err != nil {
				t.Fatal(err)
			}
			if req.PullPolicy != tt.want {
				t.Errorf("PullPolicy = %q, want %q", req.PullPolicy, tt.want)
			}
		})
	}
	for _, bad := range []string{"always", "IFNOTPRESENT", "Sometimes", " Always", "Never "} {
		t.Run("unknown "+bad, func(t *testing.T) {
			req, err := ParsePublishRequest(publishReq(withImage(AttrPullPolicy, bad)))
			assertInvalid(t, req, err, "image ghcr.io/acme/filters/header:1.2.0", `pullPolicy "`+bad+`"`, "IfNotPresent, Always, Never")
		})
	}
}

func TestParsePublishRequestSHA256(t *testing.T) {
	for _, tt := range []struct {
		pin  string
		want digest.Digest
	}{
		{"", ""},
		{hex64, "sha256:" + hex64},
		{"sha256:" + hex64, "sha256:" + hex64},
	} {
		req, err := ParsePublishRequest(publishReq(withImage(AttrSHA256, tt.pin)))
		if err != nil {
			t.Errorf("sha256 %q: %v", tt.pin, err)
			continue
		}
		if req.SHA256 != tt.want {
			t.Errorf("sha256 %q: SHA256 = %q, want %q", tt.pin, req.SHA256, tt.want)
		}
	}
	for _, bad := range []string{
		strings.ToUpper(hex64),
		"sha256:" + strings.ToUpper(hex64),
		"SHA256:" + hex64,
		hex64[:63],
		hex64 + "0",
		"sha256:" + hex64[:10],
		"sha512:" + hex64 + hex64,
		"md5:d41d8cd98f00b204e9800998ecf8427e",
		strings.Replace(hex64, "3", "g", 1),
		" " + hex64,
		"sha256:",
	} {
		req, err := ParsePublishRequest(publishReq(withImage(AttrSHA256, bad)))
		assertInvalid(t, req, err, "image ghcr.io/acme/filters/header:1.2.0", `sha256 "`+bad+`"`)
	}
}

func TestParsePublishRequestFileName(t *testing.T) {
	for _, name := range []string{"header.wasm", "plugin.wasm", "x", ".hidden.wasm", "a..b", "my filter.wasm", strings.Repeat("n", 255), ".tmp"} {
		req, err := ParsePublishRequest(publishReq(withImage(AttrFileName, name)))
		if err != nil {
			t.Errorf("fileName %q: %v", name, err)
			continue
		}
		if req.FileName != name {
			t.Errorf("fileName %q: FileName = %q", name, req.FileName)
		}
	}
	for _, tt := range []struct{ name, why string }{
		{"", "is empty"},
		{".", "is a directory name"},
		{"..", "is a directory name"},
		{"a/b", "contains / or NUL"},
		{"/etc/passwd", "contains / or NUL"},
		{"x/", "contains / or NUL"},
		{"a\x00b", "contains / or NUL"},
		{strings.Repeat("n", 256), "is longer than 255 bytes"},
		{".tmp-x", "uses the reserved prefix .tmp-"},
		{".tmp-", "uses the reserved prefix .tmp-"},
	} {
		req, err := ParsePublishRequest(publishReq(withImage(AttrFileName, tt.name)))
		assertInvalid(t, req, err, "image ghcr.io/acme/filters/header:1.2.0", "fileName", tt.why, "use a plain name")
	}
}

func TestCheckFileName(t *testing.T) {
	if err := store.CheckFileName("plugin.wasm"); err != nil {
		t.Errorf("plugin.wasm: %v", err)
	}
	if err := store.CheckFileName(""); err == nil || err.Error() != "is empty" {
		t.Errorf(`"": %v`, err)
	}
}
