package puller_test

import (
	"context"
	"net"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/wasm-csi/wasm-csi/puller"
	"github.com/wasm-csi/wasm-csi/test/lib/registrytest"
)

// TestConnectionsReusedThenClosed: concurrent pulls from one registry over
// HTTP/1.1 reuse their connections rather than dialing anew for all but
// two, and CloseIdleConnections closes every one left open.
func TestConnectionsReusedThenClosed(t *testing.T) {
	t.Parallel()
	f := newFixture(t, registrytest.Options{}, 64<<10)
	target, err := url.Parse("http://" + f.reg.Host())
	if err != nil {
		t.Fatal(err)
	}
	var opened, closed atomic.Int64
	srv := httptest.NewUnstartedServer(httputil.NewSingleHostReverseProxy(target))
	srv.Config.ConnState = func(_ net.Conn, s http.ConnState) {
		switch s {
		case http.StateNew:
			opened.Add(1)
		case http.StateClosed, http.StateHijacked:
			closed.Add(1)
		}
	}
	srv.Start()
	t.Cleanup(srv.Close)
	host := strings.TrimPrefix(srv.URL, "http://")
	ref, err := puller.ParseReference(host + "/net/filter:1.0")
	if err != nil {
		t.Fatal(err)
	}
	p := puller.New(puller.Config{InsecureRegistries: []string{host}})
	const concurrent, rounds = 8, 3
	for range rounds {
		var wg sync.WaitGroup
		errs := make(chan error, concurrent)
		for range concurrent {
			wg.Add(1)
			go func() {
				defer wg.Done()
				_, err := pull(context.Background(), p, ref)
				errs <- err
			}()
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			if err != nil {
				t.Fatal(err)
			}
		}
	}
	if n := opened.Load(); n > concurrent {
		t.Errorf("%d rounds of %d concurrent pulls opened %d connections, want at most %d: connections were not kept for reuse", rounds, concurrent, n, concurrent)
	}
	p.CloseIdleConnections()
	deadline := time.Now().Add(10 * time.Second)
	for closed.Load() < opened.Load() {
		if time.Now().After(deadline) {
			t.Fatalf("%d of %d connections still open after CloseIdleConnections", opened.Load()-closed.Load(), opened.Load())
		}
		time.Sleep(10 * time.Millisecond)
	}
}
