package csi

import (
	"context"
	"fmt"
	"net/http"
	"strings"
)

// HealthHandler serves GET (and HEAD) /healthz: 200 "ok" when every check
// passes, else 503 with each failing check's message, one per line. The
// checks run in order with the request's context; the DaemonSet's liveness
// probe calls it. Other paths are 404, so the handler can be mounted at "/"
// or at "/healthz" beside /metrics.
func HealthHandler(checks ...func(context.Context) error) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/healthz" {
			http.NotFound(w, r)
			return
		}
		if r.Method != http.MethodGet && r.Method != http.MethodHead {
			w.Header().Set("Allow", "GET, HEAD")
			http.Error(w, "method not allowed", http.StatusMethodNotAllowed)
			return
		}
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		w.Header().Set("Cache-Control", "no-store")
		var failed []string
		for _, check := range checks {
			if check == nil {
				continue
			}
			if err := runCheck(r.Context(), check); err != nil {
				failed = append(failed, err.Error())
			}
		}
		if len(failed) > 0 {
			w.WriteHeader(http.StatusServiceUnavailable)
			fmt.Fprintln(w, strings.Join(failed, "\n"))
			return
		}
		fmt.Fprint(w, "ok")
	})
}

// runCheck turns a check's panic into a failure: a broken check must fail
// the probe, not the metrics server.
func runCheck(ctx context.Context, check func(context.Context) error) (err error) {
	defer func() {
		if p := recover(); p != nil {
			err = fmt.Errorf("health check panicked: %v", p)
		}
	}()
	return check(ctx)
}
