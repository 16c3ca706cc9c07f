package csi

import (
	"context"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

// IdentityServer serves the CSI Identity service.
type IdentityServer struct {
	csipb.UnimplementedIdentityServer
	Name    string
	Version string
	// Ready reports whether the driver can serve publishes.
	Ready func() bool
}

func (s *IdentityServer) GetPluginInfo(context.Context, *csipb.GetPluginInfoRequest) (*csipb.GetPluginInfoResponse, error) {
	return &csipb.GetPluginInfoResponse{Name: s.Name, VendorVersion: s.Version}, nil
}

// GetPluginCapabilities lists none: a node-only plugin has no controller
// service and no topology.
func (s *IdentityServer) GetPluginCapabilities(context.Context, *csipb.GetPluginCapabilitiesRequest) (*csipb.GetPluginCapabilitiesResponse, error) {
	return &csipb.GetPluginCapabilitiesResponse{}, nil
}

func (s *IdentityServer) Probe(context.Context, *csipb.ProbeRequest) (*csipb.ProbeResponse, error) {
	ready := s.Ready == nil || s.Ready()
	return &csipb.ProbeResponse{Ready: wrapperspb.Bool(ready)}, nil
}
