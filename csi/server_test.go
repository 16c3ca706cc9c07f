package csi

import (
	"context"
	"log/slog"
	"net"
	"path/filepath"
	"testing"
	"time"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/wasm-csi/wasm-csi/test/lib/testlog"
)

// TestListenLimitsConnections: the CSI socket serves at most maxConns
// connections at once (kubelet dials one per call); the next waits in the
// backlog and is served as soon as one closes.
func TestListenLimitsConnections(t *testing.T) {
	path := filepath.Join(t.TempDir(), "csi.sock")
	srv, err := listen(path, 2, &IdentityServer{Name: DefaultDriverName, Version: "test"}, &NodeServer{},
		slog.New(slog.NewTextHandler(&testlog.Buffer{}, nil)))
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve()
	t.Cleanup(srv.grpc.Stop)
	probe := func(timeout time.Duration) error {
		conn, err := grpc.NewClient("unix://"+path, grpc.WithTransportCredentials(insecure.NewCredentials()))
		if err != nil {
			return err
		}
		defer conn.Close()
		ctx, cancel := context.WithTimeout(context.Background(), timeout)
		defer cancel()
		_, err = csipb.NewIdentityClient(conn).Probe(ctx, &csipb.ProbeRequest{}, grpc.WaitForReady(true))
		return err
	}
	if err := probe(10 * time.Second); err != nil {
		t.Fatalf("probe with no other connection: %v", err)
	}
	// Two idle connections (they never speak HTTP/2) take both.
	var held []net.Conn
	for range 2 {
		c, err := net.Dial("unix", path)
		if err != nil {
			t.Fatal(err)
		}
		held = append(held, c)
	}
	if err := probe(300 * time.Millisecond); err == nil {
		t.Fatal("a third connection was served while two were open, want it to wait")
	}
	done := make(chan error, 1)
	go func() { done <- probe(10 * time.Second) }()
	held[0].Close()
	if err := <-done; err != nil {
		t.Fatalf("probe after a connection closed: %v", err)
	}
	held[1].Close()
}
