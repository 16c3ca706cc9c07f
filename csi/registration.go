package csi

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"sync"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	registerapi "k8s.io/kubelet/pkg/apis/pluginregistration/v1"
)

// RegistrationSocketName is the file name of the plugin-registration socket
// in kubelet's registry directory (/var/lib/kubelet/plugins_registry), named
// as node-driver-registrar names it.
func RegistrationSocketName(driverName string) string { return driverName + "-reg.sock" }

// SupportedCSIVersions are the CSI versions the driver tells kubelet it
// speaks, as node-driver-registrar does.
var SupportedCSIVersions = []string{"1.0.0"}

// Registrar serves kubelet's plugin-registration API
// (k8s.io/kubelet/pkg/apis/pluginregistration/v1): kubelet's plugin watcher
// finds the socket in its registry directory, asks GetInfo for the driver's
// name and CSI endpoint, registers the driver and reports the outcome with
// NotifyRegistrationStatus. It is what node-driver-registrar does, inside
// the driver's own container.
type Registrar struct {
	registerapi.UnimplementedRegistrationServer

	// DriverName is the CSI driver name kubelet registers.
	DriverName string
	// Endpoint is the CSI socket's path as kubelet sees it on the host,
	// e.g. /var/lib/kubelet/plugins/wasm.csi.dev/csi.sock.
	Endpoint string
	Log      *slog.Logger

	mu       sync.Mutex
	notified bool
	status   *registerapi.RegistrationStatus
}

// GetInfo tells kubelet what is behind the socket: a CSI plugin, its name,
// where its CSI endpoint is on the host and the versions it speaks.
func (r *Registrar) GetInfo(context.Context, *registerapi.InfoRequest) (*registerapi.PluginInfo, error) {
	r.Log.Info("kubelet asked for plugin info", "driver", r.DriverName, "endpoint", r.Endpoint)
	return &registerapi.PluginInfo{
		Type:              registerapi.CSIPlugin,
		Name:              r.DriverName,
		Endpoint:          r.Endpoint,
		SupportedVersions: append([]string(nil), SupportedCSIVersions...),
	}, nil
}

// NotifyRegistrationStatus records kubelet's verdict. A refusal is logged
// with kubelet's reason and makes Registered and Check report it.
func (r *Registrar) NotifyRegistrationStatus(_ context.Context, s *registerapi.RegistrationStatus) (*registerapi.RegistrationStatusResponse, error) {
	if s == nil {
		return nil, status.Error(codes.InvalidArgument, "registration status is required")
	}
	r.mu.Lock()
	r.notified = true
	r.status = &registerapi.RegistrationStatus{PluginRegistered: s.GetPluginRegistered(), Error: s.GetError()}
	r.mu.Unlock()
	if s.GetPluginRegistered() {
		r.Log.Info("registered with kubelet", "driver", r.DriverName, "endpoint", r.Endpoint)
	} else {
		r.Log.Error("kubelet refused the registration", "driver", r.DriverName, "endpoint", r.Endpoint, "err", s.GetError())
	}
	return &registerapi.RegistrationStatusResponse{}, nil
}

// Registered reports kubelet's last verdict: (true, nil) once kubelet has
// registered the driver; (false, error with kubelet's reason) if it refused;
// (false, nil) while kubelet has not said anything yet.
func (r *Registrar) Registered() (bool, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if !r.notified {
		return false, nil
	}
	if !r.status.GetPluginRegistered() {
		reason := r.status.GetError()
		if reason == "" {
			reason = "no reason given"
		}
		return false, fmt.Errorf("kubelet refused to register CSI driver %s (endpoint %s): %s", r.DriverName, r.Endpoint, reason)
	}
	return true, nil
}

// RegistrationServer serves a Registrar on a unix socket.
type RegistrationServer struct {
	*Registrar
	path string
	grpc *grpc.Server
	lis  net.Listener
}

// ListenRegistration listens on sockPath for kubelet's plugin watcher:
// sockPath is <kubelet registry dir>/<driver-name>-reg.sock (see
// RegistrationSocketName), driverName the CSI driver name, and
// csiEndpointOnHost the CSI socket's path on the host, which kubelet dials.
// A stale socket left at sockPath by an earlier run is removed first: a new
// socket file is what makes kubelet register the driver again.
func ListenRegistration(sockPath, driverName, csiEndpointOnHost string, log *slog.Logger) (*RegistrationServer, error) {
	if sockPath == "" {
		return nil, errors.New("registration socket path is empty")
	}
	if driverName == "" {
		return nil, errors.New("driver name is empty")
	}
	if !filepath.IsAbs(csiEndpointOnHost) {
		return nil, fmt.Errorf("CSI endpoint on the host %q is not an absolute path: kubelet dials it as given", csiEndpointOnHost)
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	lis, err := listenUnix(sockPath)
	if err != nil {
		return nil, fmt.Errorf("kubelet plugin registration: %w", err)
	}
	reg := &Registrar{DriverName: driverName, Endpoint: csiEndpointOnHost, Log: log}
	g := grpc.NewServer()
	registerapi.RegisterRegistrationServer(g, reg)
	return &RegistrationServer{Registrar: reg, path: sockPath, grpc: g, lis: lis}, nil
}

// Path is the registration socket's path.
func (s *RegistrationServer) Path() string { return s.path }

// Serve answers kubelet until Stop.
func (s *RegistrationServer) Serve() error {
	s.Log.Info("serving kubelet plugin registration", "socket", s.path, "driver", s.DriverName, "endpoint", s.Endpoint)
	return s.grpc.Serve(s.lis)
}

// Stop ends the server and removes the socket, as node-driver-registrar
// does on SIGTERM: kubelet then deregisters the driver until a new socket
// appears.
func (s *RegistrationServer) Stop() {
	s.grpc.GracefulStop()
	if err := os.Remove(s.path); err != nil && !errors.Is(err, os.ErrNotExist) {
		s.Log.Warn("removing registration socket", "socket", s.path, "err", err)
	}
}

// Check is a health check (see HealthHandler): it fails when kubelet
// refused the registration, or when the socket file is gone (kubelet then
// forgets the driver). A restart makes a new socket and kubelet tries
// again, which is what node-driver-registrar gets by exiting. Not having
// heard from kubelet yet is not a failure.
func (s *RegistrationServer) Check(context.Context) error {
	if _, err := s.Registered(); err != nil {
		return err
	}
	fi, err := os.Stat(s.path)
	if err != nil {
		return fmt.Errorf("registration socket: %w", err)
	}
	if fi.Mode().Type() != os.ModeSocket {
		return fmt.Errorf("registration socket %s is not a socket any more", s.path)
	}
	return nil
}

// Collector is the wasmcsi_kubelet_registered gauge, read at scrape time:
// 1 once kubelet has registered the driver, 0 before kubelet has answered
// and after it refused. The KubeletRegistration alert in
// manifests/monitoring fires on 0 that lasts.
func (r *Registrar) Collector() prometheus.Collector {
	return prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Namespace: "wasmcsi", Name: "kubelet_registered",
		Help: "1 when kubelet has registered the driver through its plugin-registration socket, else 0.",
	}, func() float64 {
		if ok, _ := r.Registered(); ok {
			return 1
		}
		return 0
	})
}
