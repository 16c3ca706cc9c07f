// Package sanity runs csi-test's sanity suite against the real daemon: the
// CSI spec's Identity and Node behaviour, called over the unix socket.
//
// Needs: root (real mounts) and distribution's registry (bin/registry).
package sanity

import (
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"sync"
	"testing"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/kubernetes-csi/csi-test/v5/pkg/sanity"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/wasm-csi/wasm-csi/test/lib/harness"
	"github.com/wasm-csi/wasm-csi/test/lib/registrytest"
	"github.com/wasm-csi/wasm-csi/test/lib/wasmgen"
)

// volumeSource stands in for the external provisioner sanity expects: csi-test
// only takes a volume id and volume context from CreateVolume, and a
// node-only driver has no controller. It hands out the test parameters
// (the image) as the volume context, which is what a pod's inline volume
// attributes are. The driver under test is the real binary; this only
// feeds sanity its inputs.
type volumeSource struct {
	csipb.UnimplementedIdentityServer
	csipb.UnimplementedControllerServer
	mu   sync.Mutex
	vols map[string]bool
	n    int
}

func (v *volumeSource) GetPluginInfo(context.Context, *csipb.GetPluginInfoRequest) (*csipb.GetPluginInfoResponse, error) {
	return &csipb.GetPluginInfoResponse{Name: "volume-source.test", VendorVersion: "0"}, nil
}

func (v *volumeSource) GetPluginCapabilities(context.Context, *csipb.GetPluginCapabilitiesRequest) (*csipb.GetPluginCapabilitiesResponse, error) {
	return &csipb.GetPluginCapabilitiesResponse{}, nil
}

func (v *volumeSource) Probe(context.Context, *csipb.ProbeRequest) (*csipb.ProbeResponse, error) {
	return &csipb.ProbeResponse{}, nil
}

func (v *volumeSource) ControllerGetCapabilities(context.Context, *csipb.ControllerGetCapabilitiesRequest) (*csipb.ControllerGetCapabilitiesResponse, error) {
	return &csipb.ControllerGetCapabilitiesResponse{}, nil
}

func (v *volumeSource) CreateVolume(_ context.Context, r *csipb.CreateVolumeRequest) (*csipb.CreateVolumeResponse, error) {
	v.mu.Lock()
	defer v.mu.Unlock()
	v.n++
	id := fmt.Sprintf("sanity-%d", v.n)
	v.vols[id] = true
	return &csipb.CreateVolumeResponse{Volume: &csipb.Volume{VolumeId: id, VolumeContext: r.GetParameters()}}, nil
}

func (v *volumeSource) DeleteVolume(_ context.Context, r *csipb.DeleteVolumeRequest) (*csipb.DeleteVolumeResponse, error) {
	v.mu.Lock()
	defer v.mu.Unlock()
	delete(v.vols, r.GetVolumeId())
	return &csipb.DeleteVolumeResponse{}, nil
}

func (v *volumeSource) ValidateVolumeCapabilities(_ context.Context, r *csipb.ValidateVolumeCapabilitiesRequest) (*csipb.ValidateVolumeCapabilitiesResponse, error) {
	if r.GetVolumeId() == "" || len(r.GetVolumeCapabilities()) == 0 {
		return nil, status.Error(codes.InvalidArgument, "volume id and capabilities are required")
	}
	v.mu.Lock()
	defer v.mu.Unlock()
	if !v.vols[r.GetVolumeId()] {
		return nil, status.Error(codes.NotFound, "no such volume")
	}
	return &csipb.ValidateVolumeCapabilitiesResponse{}, nil
}

func TestSanity(t *testing.T) {
	harness.RequireRoot(t)
	ctx := context.Background()
	reg := registrytest.StartT(t, registrytest.Options{})
	image := reg.Host() + "/sanity/plugin:1.0"
	if _, err := registrytest.PushWasm(ctx, image, wasmgen.ProxyWasm(wasmgen.Options{}), registrytest.LayoutCNCF); err != nil {
		t.Fatal(err)
	}
	bin, err := harness.BuildDriver(t.TempDir(), true)
	if err != nil {
		t.Fatal(err)
	}
	d := harness.StartDaemon(t, bin, harness.DaemonOptions{Args: []string{"--insecure-registry=" + reg.Host()}})

	srcSock := filepath.Join(t.TempDir(), "source.sock")
	lis, err := net.Listen("unix", srcSock)
	if err != nil {
		t.Fatal(err)
	}
	g := grpc.NewServer()
	src := &volumeSource{vols: map[string]bool{}}
	csipb.RegisterIdentityServer(g, src)
	csipb.RegisterControllerServer(g, src)
	go g.Serve(lis)
	t.Cleanup(g.Stop)

	base := t.TempDir()
	cfg := sanity.NewTestConfig()
	cfg.Address = "unix://" + d.Socket
	cfg.ControllerAddress = "unix://" + srcSock
	cfg.TargetPath = filepath.Join(base, "mount")
	cfg.StagingPath = filepath.Join(base, "staging")
	cfg.TestVolumeParameters = map[string]string{
		"image":                        image,
		"csi.storage.k8s.io/ephemeral": "true",
	}
	sanity.Test(t, cfg)
	if _, err := os.Stat(filepath.Join(base, "mount", "target")); err == nil {
		t.Errorf("sanity left a target path behind")
	}
}
