package puller

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"oras.land/oras-go/v2/registry/remote/retry"
)

// Defaults for Config's timeouts.
const (
	DefaultDialTimeout           = 30 * time.Second
	DefaultTLSHandshakeTimeout   = 15 * time.Second
	DefaultResponseHeaderTimeout = 30 * time.Second
	DefaultIdleTimeout           = 30 * time.Second
	DefaultRetryBudget           = time.Minute
)

// defaultTransport is the base transport: bounded connect, TLS handshake
// and response-header waits, and every dial checked by policy.
func defaultTransport(cfg Config, policy *addressPolicy) *http.Transport {
	dialer := &net.Dialer{Timeout: DefaultDialTimeout, KeepAlive: 30 * time.Second}
	return &http.Transport{
		Proxy:             policy.proxy,
		DialContext:       policy.dialContext(dialer),
		ForceAttemptHTTP2: true,
		MaxIdleConns:      32,
		// A burst's manifest requests and downloads (4 and 1 per pull
		// slot) reuse their connections to a registry served over
		// HTTP/1.1 instead of dialing anew for all but 2 (the default):
		// each new connection was two goroutines and 8 KiB of buffers,
		// thrown away. Puller.CloseIdleConnections closes them after.
		MaxIdleConnsPerHost:   32,
		IdleConnTimeout:       90 * time.Second,
		TLSHandshakeTimeout:   DefaultTLSHandshakeTimeout,
		ResponseHeaderTimeout: cfg.ResponseHeaderTimeout,
		ExpectContinueTimeout: time.Second,
	}
}

// retryTransport retries a request that failed in a way another attempt
// may not: what oras-go's retry.DefaultPredicate retries (5xx, 429, 408,
// timeouts, connection resets, an unexpected EOF), and, for GET and HEAD, a
// connection closed before the answer (io.EOF), which net/http retries on
// its own only on a reused connection. Waits grow exponentially (200ms to
// 3s, 5 retries at most, as oras-go's default), and no retry starts once
// budget has passed since the first attempt. A refused dial is never
// retried.
type retryTransport struct {
	base   http.RoundTripper
	budget time.Duration
}

func (t *retryTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	idempotent := req.Method == http.MethodGet || req.Method == http.MethodHead
	deadline := time.Now().Add(t.budget)
	policy := &budgetPolicy{deadline: deadline, GenericPolicy: retry.GenericPolicy{
		Retryable: func(resp *http.Response, err error) (bool, error) {
			if err != nil && isBlocked(err) {
				return false, err
			}
			if err != nil && idempotent && errors.Is(err, io.EOF) {
				return true, nil
			}
			return retry.DefaultPredicate(resp, err)
		},
		Backoff:  retry.DefaultBackoff,
		MinWait:  200 * time.Millisecond,
		MaxWait:  3 * time.Second,
		MaxRetry: 5,
	}}
	rt := &retry.Transport{Base: t.base, Policy: func() retry.Policy { return policy }}
	return rt.RoundTrip(req)
}

// budgetPolicy is a retry policy that starts no retry past deadline.
type budgetPolicy struct {
	retry.GenericPolicy
	deadline time.Time
}

func (p *budgetPolicy) Retry(attempt int, resp *http.Response, err error) (time.Duration, error) {
	d, rerr := p.GenericPolicy.Retry(attempt, resp, err)
	if d >= 0 && time.Now().Add(d).After(p.deadline) {
		return -1, nil
	}
	return d, rerr
}

// idleTransport cuts off a response body that sends nothing for idle
// while it is read: a registry that answers, then stalls, fails the pull
// instead of holding it (and every publish joined to it) for ever.
type idleTransport struct {
	base http.RoundTripper
	idle time.Duration
}

func (t *idleTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	ctx, cancel := context.WithCancelCause(req.Context())
	resp, err := t.base.RoundTrip(req.WithContext(ctx))
	if err != nil {
		cancel(nil)
		return nil, err
	}
	r := &idleReader{body: resp.Body, idle: t.idle, cancel: cancel, host: req.URL.Host}
	r.timer = time.AfterFunc(time.Hour, r.fire)
	r.timer.Stop()
	resp.Body = r
	return resp, nil
}

// idleReader is a response body whose Read fails once the body has sent
// nothing for idle.
type idleReader struct {
	body   io.ReadCloser
	idle   time.Duration
	cancel context.CancelCauseFunc
	host   string
	timer  *time.Timer

	fired  atomic.Bool
	mu     sync.Mutex
	closed bool
}

func (r *idleReader) fire() {
	r.fired.Store(true)
	r.cancel(&idleError{host: r.host, idle: r.idle})
}

func (r *idleReader) Read(p []byte) (int, error) {
	if r.fired.Load() {
		return 0, &idleError{host: r.host, idle: r.idle}
	}
	r.mu.Lock()
	if !r.closed {
		r.timer.Reset(r.idle)
	}
	r.mu.Unlock()
	n, err := r.body.Read(p)
	r.timer.Stop()
	if err != nil && r.fired.Load() {
		return n, &idleError{host: r.host, idle: r.idle}
	}
	return n, err
}

func (r *idleReader) Close() error {
	r.mu.Lock()
	r.closed = true
	r.mu.Unlock()
	r.timer.Stop()
	err := r.body.Close()
	r.cancel(nil)
	return err
}

// idleError is a response body cut off for sending nothing. It is a
// net.Error that timed out.
type idleError struct {
	host string
	idle time.Duration
}

func (e *idleError) Error() string {
	return fmt.Sprintf("%s sent nothing for %s in the middle of a response; cut off", e.host, e.idle)
}
func (e *idleError) Timeout() bool   { return true }
func (e *idleError) Temporary() bool { return true }

// closeIdle closes the idle connections of rt, if it keeps any.
func closeIdle(rt http.RoundTripper) {
	if c, ok := rt.(interface{ CloseIdleConnections() }); ok {
		c.CloseIdleConnections()
	}
}

// CloseIdleConnections closes the idle connections of the transport
// under t.
func (t *retryTransport) CloseIdleConnections() { closeIdle(t.base) }

// CloseIdleConnections closes the idle connections of the transport
// under t.
func (t *idleTransport) CloseIdleConnections() { closeIdle(t.base) }
