package csi

import (
	"context"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
)

type ctxKey struct{}

func getHealth(t *testing.T, h http.Handler, method, path string) (int, string) {
	t.Helper()
	srv := httptest.NewServer(h)
	defer srv.Close()
	req, err := http.NewRequest(method, srv.URL+path, nil)
	if err != nil {
		t.Fatal(err)
	}
	resp, err := srv.Client().Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp.StatusCode, string(body)
}

func TestHealthHandlerOK(t *testing.T) {
	var calls int
	pass := func(ctx context.Context) error {
		calls++
		if ctx == nil || ctx.Err() != nil {
			return errors.New("check got no live request context")
		}
		return nil
	}
	code, body := getHealth(t, HealthHandler(pass, nil, pass), "GET", "/healthz")
	if code != 200 || body != "ok" {
		t.Errorf("GET /healthz = %d %q, want 200 \"ok\"", code, body)
	}
	if calls != 2 {
		t.Errorf("%d checks ran, want 2", calls)
	}
	if code, body := getHealth(t, HealthHandler(), "GET", "/healthz"); code != 200 || body != "ok" {
		t.Errorf("no checks: GET /healthz = %d %q, want 200 \"ok\"", code, body)
	}
	if code, body := getHealth(t, HealthHandler(pass), "HEAD", "/healthz"); code != 200 || body != "" {
		t.Errorf("HEAD /healthz = %d %q, want 200 and no body", code, body)
	}
}

func TestHealthHandlerFailing(t *testing.T) {
	pass := func(context.Context) error { return nil }
	storeFull := func(context.Context) error { return errors.New("store /var/lib/wasm-csi: not writable") }
	refused := func(context.Context) error { return errors.New("kubelet refused to register CSI driver wasm.csi.dev") }

	code, body := getHealth(t, HealthHandler(pass, storeFull), "GET", "/healthz")
	if code != http.StatusServiceUnavailable || !strings.Contains(body, "store /var/lib/wasm-csi: not writable") {
		t.Errorf("one failing check: %d %q, want 503 with its message", code, body)
	}
	if strings.Contains(body, "ok") {
		t.Errorf("failing response says ok: %q", body)
	}
	code, body = getHealth(t, HealthHandler(storeFull, pass, refused), "GET", "/healthz")
	if code != http.StatusServiceUnavailable || !strings.Contains(body, "not writable") || !strings.Contains(body, "kubelet refused") {
		t.Errorf("two failing checks: %d %q, want 503 with both messages", code, body)
	}
	panics := func(context.Context) error { panic("nil map") }
	code, body = getHealth(t, HealthHandler(pass, panics), "GET", "/healthz")
	if code != http.StatusServiceUnavailable || !strings.Contains(body, "nil map") {
		t.Errorf("panicking check: %d %q, want 503 naming the panic", code, body)
	}
}

func TestHealthHandlerRoutes(t *testing.T) {
	h := HealthHandler()
	if code, _ := getHealth(t, h, "GET", "/metrics"); code != http.StatusNotFound {
		t.Errorf("GET /metrics = %d, want 404", code)
	}
	if code, _ := getHealth(t, h, "POST", "/healthz"); code != http.StatusMethodNotAllowed {
		t.Errorf("POST /healthz = %d, want 405", code)
	}
	// Mounted on a mux beside other handlers, it answers /healthz.
	mux := http.NewServeMux()
	mux.Handle("/healthz", HealthHandler(func(ctx context.Context) error {
		if ctx.Value(ctxKey{}) != nil {
			return errors.New("unexpected value")
		}
		return nil
	}))
	if code, body := getHealth(t, mux, "GET", "/healthz"); code != 200 || body != "ok" {
		t.Errorf("through a mux: %d %q", code, body)
	}
}
