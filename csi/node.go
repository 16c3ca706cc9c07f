package csi

import (
	"context"
	"fmt"
	"path/filepath"
	"strings"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/opencontainers/go-digest"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/wasm-csi/wasm-csi/node"
	"github.com/wasm-csi/wasm-csi/node/store"
	"github.com/wasm-csi/wasm-csi/puller"
)

// Volume attribute keys a pod writes, and those kubelet adds.
const (
	AttrImage      = "image"
	AttrPullPolicy = "pullPolicy"
	AttrSHA256     = "sha256"
	AttrFileName   = "fileName"

	attrEphemeral      = "csi.storage.k8s.io/ephemeral"
	attrPodName        = "csi.storage.k8s.io/pod.name"
	attrPodNamespace   = "csi.storage.k8s.io/pod.namespace"
	attrPodUID         = "csi.storage.k8s.io/pod.uid"
	attrServiceAccount = "csi.storage.k8s.io/serviceAccount.name"
)

// Publisher is the node logic the Node service calls.
type Publisher interface {
	Publish(ctx context.Context, req node.PublishRequest) error
	Unpublish(ctx context.Context, volumeID, targetPath string) error
}

// NodeServer serves the CSI Node service.
type NodeServer struct {
	csipb.UnimplementedNodeServer
	NodeID    string
	Publisher Publisher
}

func (s *NodeServer) NodeGetInfo(context.Context, *csipb.NodeGetInfoRequest) (*csipb.NodeGetInfoResponse, error) {
	return &csipb.NodeGetInfoResponse{NodeId: s.NodeID}, nil
}

// NodeGetCapabilities lists none: there is no staging, no stats, no expansion.
func (s *NodeServer) NodeGetCapabilities(context.Context, *csipb.NodeGetCapabilitiesRequest) (*csipb.NodeGetCapabilitiesResponse, error) {
	return &csipb.NodeGetCapabilitiesResponse{}, nil
}

func (s *NodeServer) NodePublishVolume(ctx context.Context, r *csipb.NodePublishVolumeRequest) (*csipb.NodePublishVolumeResponse, error) {
	req, err := ParsePublishRequest(r)
	if err != nil {
		return nil, err
	}
	if err := s.Publisher.Publish(ctx, req); err != nil {
		return nil, toStatus(err)
	}
	return &csipb.NodePublishVolumeResponse{}, nil
}

func (s *NodeServer) NodeUnpublishVolume(ctx context.Context, r *csipb.NodeUnpublishVolumeRequest) (*csipb.NodeUnpublishVolumeResponse, error) {
	if r.GetVolumeId() == "" {
		return nil, status.Error(codes.InvalidArgument, "volume_id is required")
	}
	if r.GetTargetPath() == "" {
		return nil, status.Error(codes.InvalidArgument, "target_path is required")
	}
	if !filepath.IsAbs(r.GetTargetPath()) {
		return nil, status.Errorf(codes.InvalidArgument, "target_path %q is not absolute", r.GetTargetPath())
	}
	if err := s.Publisher.Unpublish(ctx, r.GetVolumeId(), filepath.Clean(r.GetTargetPath())); err != nil {
		return nil, toStatus(err)
	}
	return &csipb.NodeUnpublishVolumeResponse{}, nil
}

// ParsePublishRequest validates a NodePublishVolume request and reads its
// volume attributes. Errors are InvalidArgument statuses naming the image.
func ParsePublishRequest(r *csipb.NodePublishVolumeRequest) (node.PublishRequest, error) {
	invalid := func(format string, args ...any) error {
		return status.Error(codes.InvalidArgument, fmt.Sprintf(format, args...))
	}
	if r.GetVolumeId() == "" {
		return node.PublishRequest{}, invalid("volume_id is required")
	}
	if r.GetTargetPath() == "" {
		return node.PublishRequest{}, invalid("target_path is required")
	}
	if !filepath.IsAbs(r.GetTargetPath()) {
		return node.PublishRequest{}, invalid("target_path %q is not absolute", r.GetTargetPath())
	}
	vc := r.GetVolumeCapability()
	if vc == nil {
		return node.PublishRequest{}, invalid("volume_capability is required")
	}
	if vc.GetMount() == nil {
		return node.PublishRequest{}, invalid("only mount volumes are supported, not block")
	}
	attrs := r.GetVolumeContext()
	imageAttr, ok := attrs[AttrImage]
	if !ok || strings.TrimSpace(imageAttr) == "" {
		return node.PublishRequest{}, invalid("volume attribute %q is required: the OCI reference of the Wasm module, e.g. ghcr.io/acme/filter:1.0", AttrImage)
	}
	ref, err := puller.ParseReference(imageAttr)
	if err != nil {
		return node.PublishRequest{}, toStatus(err)
	}
	req := node.PublishRequest{
		VolumeID:   r.GetVolumeId(),
		TargetPath: filepath.Clean(r.GetTargetPath()),
		Image:      ref,
		FileName:   node.DefaultFileName,
		Pod: node.PodInfo{
			Name: attrs[attrPodName], Namespace: attrs[attrPodNamespace],
			UID: attrs[attrPodUID], ServiceAccount: attrs[attrServiceAccount],
		},
	}
	switch p := attrs[AttrPullPolicy]; p {
	case "":
		req.PullPolicy = node.PullIfNotPresent
		if ref.IsLatest() {
			req.PullPolicy = node.PullAlways
		}
	case string(node.PullIfNotPresent), string(node.PullAlways), string(node.PullNever):
		req.PullPolicy = node.PullPolicy(p)
	default:
		return node.PublishRequest{}, invalid("image %s: pullPolicy %q is not one of IfNotPresent, Always, Never", imageAttr, p)
	}
	if pin, ok := attrs[AttrSHA256]; ok && pin != "" {
		d := digest.Digest(pin)
		if !strings.HasPrefix(pin, "sha256:") {
			d = digest.NewDigestFromEncoded(digest.SHA256, pin)
		}
		if d.Algorithm() != digest.SHA256 || d.Validate() != nil {
			return node.PublishRequest{}, invalid("image %s: sha256 %q is not 64 lowercase hex digits", imageAttr, pin)
		}
		req.SHA256 = d
	}
	if name, ok := attrs[AttrFileName]; ok {
		if err := store.CheckFileName(name); err != nil {
			return node.PublishRequest{}, invalid("image %s: fileName %q %s; use a plain name like header.wasm", imageAttr, name, err)
		}
		req.FileName = name
	}
	return req, nil
}
