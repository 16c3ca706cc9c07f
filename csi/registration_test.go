package csi

import (
	"context"
	"encoding/json"
	"errors"
	"log/slog"
	"net"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	registerapi "k8s.io/kubelet/pkg/apis/pluginregistration/v1"

	"github.com/wasm-csi/wasm-csi/test/lib/testlog"
)

const regTestHostEndpoint = "/var/lib/kubelet/plugins/wasm.csi.dev/csi.sock"

func serveRegistration(t *testing.T, prepare func(path string)) (*RegistrationServer, registerapi.RegistrationClient, *testlog.Buffer) {
	t.Helper()
	dir := t.TempDir()
	path := filepath.Join(dir, RegistrationSocketName(DefaultDriverName))
	if prepare != nil {
		prepare(path)
	}
	logs := &testlog.Buffer{}
	log := slog.New(slog.NewJSONHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	srv, err := ListenRegistration(path, DefaultDriverName, regTestHostEndpoint, log)
	if err != nil {
		t.Fatalf("ListenRegistration: %v", err)
	}
	served := make(chan error, 1)
	go func() { served <- srv.Serve() }()
	t.Cleanup(func() {
		srv.Stop()
		select {
		case err := <-served:
			// ErrServerStopped: Stop came before Serve began.
			if err != nil && !errors.Is(err, grpc.ErrServerStopped) {
				t.Errorf("Serve returned %v after Stop", err)
			}
		case <-time.After(10 * time.Second):
			t.Error("Serve did not return after Stop")
		}
	})
	// Dial the way kubelet's plugin watcher does: gRPC over the unix socket.
	conn, err := grpc.NewClient("unix://"+path, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatalf("dialing %s: %v", path, err)
	}
	t.Cleanup(func() { conn.Close() })
	return srv, registerapi.NewRegistrationClient(conn), logs
}

func regCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func TestRegistrationSocketName(t *testing.T) {
	if got, want := RegistrationSocketName("wasm.csi.dev"), "wasm.csi.dev-reg.sock"; got != want {
		t.Errorf("RegistrationSocketName = %q, want %q (node-driver-registrar's name)", got, want)
	}
}

func TestRegistrationGetInfo(t *testing.T) {
	srv, client, _ := serveRegistration(t, nil)
	fi, err := os.Stat(srv.Path())
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Type() != os.ModeSocket {
		t.Fatalf("%s is %v, not a socket", srv.Path(), fi.Mode())
	}
	info, err := client.GetInfo(regCtx(t), &registerapi.InfoRequest{})
	if err != nil {
		t.Fatalf("GetInfo: %v", err)
	}
	if info.GetType() != registerapi.CSIPlugin || info.GetType() != "CSIPlugin" {
		t.Errorf("type = %q, want CSIPlugin", info.GetType())
	}
	if info.GetName() != "wasm.csi.dev" {
		t.Errorf("name = %q, want wasm.csi.dev", info.GetName())
	}
	if info.GetEndpoint() != regTestHostEndpoint {
		t.Errorf("endpoint = %q, want the CSI socket on the host %q", info.GetEndpoint(), regTestHostEndpoint)
	}
	if !slices.Equal(info.GetSupportedVersions(), []string{"1.0.0"}) {
		t.Errorf("supported versions = %q, want [1.0.0]", info.GetSupportedVersions())
	}
}

func TestRegistrationStatus(t *testing.T) {
	srv, client, logs := serveRegistration(t, nil)
	ctx := regCtx(t)

	if ok, err := srv.Registered(); ok || err != nil {
		t.Fatalf("before kubelet's answer: Registered() = %v, %v; want false, nil", ok, err)
	}
	gauge := srv.Collector()
	checkGauge := func(when string, want float64) {
		t.Helper()
		if got := testutil.ToFloat64(gauge); got != want {
			t.Errorf("%s: wasmcsi_kubelet_registered = %v, want %v", when, got, want)
		}
	}
	checkGauge("before kubelet's answer", 0)
	if err := srv.Check(ctx); err != nil {
		t.Fatalf("before kubelet's answer: Check() = %v; not hearing from kubelet yet is not a failure", err)
	}

	if _, err := client.NotifyRegistrationStatus(ctx, &registerapi.RegistrationStatus{PluginRegistered: true}); err != nil {
		t.Fatalf("NotifyRegistrationStatus(registered): %v", err)
	}
	if ok, err := srv.Registered(); !ok || err != nil {
		t.Fatalf("after registration: Registered() = %v, %v; want true, nil", ok, err)
	}
	if err := srv.Check(ctx); err != nil {
		t.Fatalf("after registration: Check() = %v", err)
	}
	checkGauge("after registration", 1)
	if !strings.Contains(logs.String(), "registered with kubelet") {
		t.Errorf("log does not say the driver registered:\n%s", logs)
	}

	const reason = "RegisterPlugin error -- plugin validation failed: highest supported version is not 1.x"
	if _, err := client.NotifyRegistrationStatus(ctx, &registerapi.RegistrationStatus{PluginRegistered: false, Error: reason}); err != nil {
		t.Fatalf("NotifyRegistrationStatus(refused): %v", err)
	}
	ok, err := srv.Registered()
	if ok || err == nil || !strings.Contains(err.Error(), reason) || !strings.Contains(err.Error(), "wasm.csi.dev") {
		t.Fatalf("after a refusal: Registered() = %v, %v; want false and an error naming the driver with kubelet's reason", ok, err)
	}
	if err := srv.Check(ctx); err == nil || !strings.Contains(err.Error(), reason) {
		t.Fatalf("after a refusal: Check() = %v; want kubelet's reason", err)
	}
	checkGauge("after a refusal", 0)
	var refused map[string]any
	for _, line := range strings.Split(strings.TrimSpace(logs.String()), "\n") {
		var rec map[string]any
		if err := json.Unmarshal([]byte(line), &rec); err != nil {
			t.Fatalf("log line %q: %v", line, err)
		}
		if rec["msg"] == "kubelet refused the registration" {
			refused = rec
		}
	}
	if refused == nil || refused["level"] != "ERROR" || refused["err"] != reason || refused["driver"] != "wasm.csi.dev" {
		t.Errorf("refusal not logged as an ERROR with the driver and kubelet's reason; log:\n%s", logs)
	}

	// The liveness probe sees the refusal through the health handler.
	rec := httptest.NewRecorder()
	HealthHandler(srv.Check).ServeHTTP(rec, httptest.NewRequest("GET", "/healthz", nil))
	if rec.Code != 503 || !strings.Contains(rec.Body.String(), reason) {
		t.Errorf("/healthz after a refusal = %d %q; want 503 with kubelet's reason", rec.Code, rec.Body)
	}

	// A later success (kubelet retried) clears it.
	if _, err := client.NotifyRegistrationStatus(ctx, &registerapi.RegistrationStatus{PluginRegistered: true}); err != nil {
		t.Fatal(err)
	}
	if ok, err := srv.Registered(); !ok || err != nil {
		t.Fatalf("after a new registration: Registered() = %v, %v; want true, nil", ok, err)
	}
	checkGauge("after a new registration", 1)
}

func TestRegistrationCheckSocketGone(t *testing.T) {
	srv, _, _ := serveRegistration(t, nil)
	if err := os.Remove(srv.Path()); err != nil {
		t.Fatal(err)
	}
	if err := srv.Check(context.Background()); err == nil {
		t.Fatal("Check() passed with the registration socket removed; kubelet has forgotten the driver")
	}
}

func TestListenRegistrationRemovesStaleSocket(t *testing.T) {
	for name, prepare := range map[string]func(t *testing.T, path string){
		// What a killed driver leaves: a socket file nobody listens on.
		"dead socket": func(t *testing.T, path string) {
			l, err := net.Listen("unix", path)
			if err != nil {
				t.Fatal(err)
			}
			l.(*net.UnixListener).SetUnlinkOnClose(false)
			l.Close()
		},
		"plain file": func(t *testing.T, path string) {
			if err := os.WriteFile(path, []byte("stale"), 0o600); err != nil {
				t.Fatal(err)
			}
		},
	} {
		t.Run(name, func(t *testing.T) {
			var stale bool
			srv, client, _ := serveRegistration(t, func(path string) {
				prepare(t, path)
				_, err := os.Lstat(path)
				stale = err == nil
			})
			if !stale {
				t.Fatal("the stale file was not made")
			}
			info, err := client.GetInfo(regCtx(t), &registerapi.InfoRequest{})
			if err != nil {
				t.Fatalf("GetInfo over the new socket: %v", err)
			}
			if info.GetName() != DefaultDriverName {
				t.Errorf("name = %q", info.GetName())
			}
			srv.Stop()
			if _, err := os.Lstat(srv.Path()); !os.IsNotExist(err) {
				t.Errorf("socket still there after Stop (%v): kubelet would not deregister the driver", err)
			}
		})
	}
}

func TestListenRegistrationArgs(t *testing.T) {
	dir := t.TempDir()
	sock := filepath.Join(dir, "x-reg.sock")
	if _, err := ListenRegistration(sock, DefaultDriverName, "csi.sock", nil); err == nil {
		t.Error("a relative CSI endpoint was accepted; kubelet needs the host path")
	}
	if _, err := ListenRegistration(sock, "", regTestHostEndpoint, nil); err == nil {
		t.Error("an empty driver name was accepted")
	}
	if _, err := ListenRegistration("", DefaultDriverName, regTestHostEndpoint, nil); err == nil {
		t.Error("an empty socket path was accepted")
	}
	// A missing registry directory is made.
	srv, err := ListenRegistration(filepath.Join(dir, "sub", "x-reg.sock"), DefaultDriverName, regTestHostEndpoint, nil)
	if err != nil {
		t.Fatalf("ListenRegistration in a new directory: %v", err)
	}
	go srv.Serve()
	srv.Stop()
}
