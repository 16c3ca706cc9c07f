package csi

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"time"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/net/netutil"
	"google.golang.org/grpc"
	"google.golang.org/grpc/status"

	"github.com/wasm-csi/wasm-csi/node"
)

// ParseEndpoint returns the socket path of a "unix:///path" endpoint.
func ParseEndpoint(ep string) (string, error) {
	switch {
	case strings.HasPrefix(ep, "unix://"):
		p := strings.TrimPrefix(ep, "unix://")
		if p == "" {
			return "", fmt.Errorf("endpoint %q has no path", ep)
		}
		return p, nil
	case strings.HasPrefix(ep, "/"):
		return ep, nil
	}
	return "", fmt.Errorf("endpoint %q is not unix:///path", ep)
}

// listenUnix listens on a unix socket at path, creating its directory and
// removing a stale socket an earlier run left there.
func listenUnix(path string) (net.Listener, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o750); err != nil {
		return nil, err
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("removing stale socket %s: %w", path, err)
	}
	lis, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("listening on %s: %w", path, err)
	}
	return lis, nil
}

// Server serves Identity and Node on a unix socket.
type Server struct {
	grpc *grpc.Server
	lis  net.Listener
	path string
}

// Listen removes a stale socket at path, listens there and registers the
// services. Serve starts answering.
func Listen(path string, id *IdentityServer, ns *NodeServer, log *slog.Logger) (*Server, error) {
	return listen(path, MaxConnections, id, ns, log)
}

// MaxConnections is how many connections the CSI socket serves at once;
// more wait, unaccepted, in the socket's backlog. kubelet dials a
// connection per call, and each one the server accepts costs it three
// goroutines and their stacks: a burst of 1,000 publishes held 1,000 of
// them. It is twice node.MaxHeldCallers: publishes whose pulls are queued
// past that return at once (their retry joins the pull), so connections
// keep turning over and a publish of a module on the node is not kept
// waiting behind them.
const MaxConnections = 2 * node.MaxHeldCallers

func listen(path string, maxConns int, id *IdentityServer, ns *NodeServer, log *slog.Logger) (*Server, error) {
	lis, err := listenUnix(path)
	if err != nil {
		return nil, err
	}
	lis = netutil.LimitListener(lis, maxConns)
	// CSI messages are small: no 32 KiB read and write buffers per
	// connection (gRPC's default), which 1,000 connections multiplied.
	g := grpc.NewServer(grpc.UnaryInterceptor(logCalls(log)),
		grpc.ReadBufferSize(0), grpc.WriteBufferSize(0), grpc.SharedWriteBuffer(true))
	csipb.RegisterIdentityServer(g, id)
	csipb.RegisterNodeServer(g, ns)
	return &Server{grpc: g, lis: lis, path: path}, nil
}

// Serve answers calls until Stop.
func (s *Server) Serve() error { return s.grpc.Serve(s.lis) }

// Check connects to the socket, as kubelet would: a health check that
// fails if the socket was removed or the server stopped accepting.
func (s *Server) Check(ctx context.Context) error {
	var d net.Dialer
	c, err := d.DialContext(ctx, "unix", s.path)
	if err != nil {
		return fmt.Errorf("CSI socket %s: %w", s.path, err)
	}
	return c.Close()
}

// Stop ends the server, letting calls in flight finish.
func (s *Server) Stop() { s.grpc.GracefulStop() }

// logCalls logs every call with its method, volume, duration and code.
// Requests are not logged whole: NodePublishVolume may carry secrets.
func logCalls(log *slog.Logger) grpc.UnaryServerInterceptor {
	return func(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
		start := time.Now()
		resp, err := handler(ctx, req)
		attrs := []any{"method", info.FullMethod, "duration", time.Since(start), "code", status.Code(err).String()}
		if v, ok := req.(interface{ GetVolumeId() string }); ok && v.GetVolumeId() != "" {
			attrs = append(attrs, "volume", v.GetVolumeId())
		}
		switch {
		case err != nil:
			log.Warn("csi call failed", append(attrs, "err", status.Convert(err).Message())...)
		case strings.HasSuffix(info.FullMethod, "Probe"), strings.HasSuffix(info.FullMethod, "Capabilities"), strings.HasSuffix(info.FullMethod, "Info"):
			log.Debug("csi call", attrs...)
		default:
			log.Info("csi call", attrs...)
		}
		return resp, err
	}
}
