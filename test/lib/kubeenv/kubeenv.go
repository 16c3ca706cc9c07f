// Package kubeenv runs a real kube-apiserver and etcd on 127.0.0.1 for tests.
//
// The apiserver authorizes with Node,RBAC, so a test that runs code under a
// ServiceAccount's token (KubeconfigForServiceAccount) or a user's client
// certificate (KubeconfigForUser) sees exactly the permissions its ClusterRole
// grants: a missing rule is a Forbidden error, as in a real cluster. There is
// no controller-manager, scheduler or kubelet: objects are stored and served,
// nothing reconciles them (no pods run, no "default" ServiceAccount appears in
// a new namespace unless CreateNamespace makes it).
//
// Binaries: kube-apiserver (and kubectl, for Kubectl and ApplyKustomize) come
// from Options.BinDir, else $WASM_CSI_KUBE_BIN_DIR, else <repo>/bin, where
// `test/kube/build.sh bin kube-apiserver kubectl` puts them. etcd is
// Options.EtcdPath, else $WASM_CSI_ETCD_BIN, else BinDir/etcd, else
// /usr/bin/etcd (Debian's etcd-server), else etcd on $PATH.
package kubeenv

import (
	"bytes"
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/wasm-csi/wasm-csi/test/lib/harness"

	authenticationv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/discovery/cached/memory"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/restmapper"
	clientcmdv1 "k8s.io/client-go/tools/clientcmd/api/v1"
	"sigs.k8s.io/yaml"
)

// Environment variables that locate the binaries.
const (
	EnvBinDir  = "WASM_CSI_KUBE_BIN_DIR" // directory holding kube-apiserver and kubectl
	EnvEtcdBin = "WASM_CSI_ETCD_BIN"     // path of the etcd binary
)

// Fixed facts of every Env.
const (
	ServiceClusterIPRange = "10.0.0.0/24"
	ServiceAccountIssuer  = "https://kubernetes.default.svc.cluster.local"
	// AdminUser is the user name in the admin client certificate; its group
	// is system:masters.
	AdminUser = "kubeenv:admin"
)

// ErrMissingBinaries is wrapped by Start's error when kube-apiserver or etcd
// cannot be found. StartT skips the test on it unless $CI is set.
var ErrMissingBinaries = errors.New("kube-apiserver or etcd binary not found")

// Options configure Start. The zero value is ready to use.
type Options struct {
	// BinDir holds kube-apiserver and kubectl; see the package comment for
	// the default.
	BinDir string
	// EtcdPath is the etcd binary; see the package comment for the default.
	EtcdPath string
	// APIServerArgs are added after the default flags; a later flag wins.
	APIServerArgs []string
	// StartTimeout bounds the start of etcd and the apiserver together;
	// default 90s (a start takes a few seconds). The ctx passed to Start
	// bounds it too.
	StartTimeout time.Duration
	// Logf, if set, receives progress lines during Start only.
	Logf func(format string, args ...any)
}

// Env is a running etcd and kube-apiserver. Close stops both.
type Env struct {
	// URL is the apiserver's address, https://127.0.0.1:PORT.
	URL string
	// EtcdURL is etcd's client address, http://127.0.0.1:PORT.
	EtcdURL string
	// Config is an admin client configuration: a client certificate in group
	// system:masters. Copy it (rest.CopyConfig) before changing it.
	Config *rest.Config
	// Client and Dynamic are admin clients built from Config.
	Client  kubernetes.Interface
	Dynamic dynamic.Interface
	// AdminKubeconfig is the path of a kubeconfig file for the admin.
	AdminKubeconfig string

	// Dir is the temporary directory holding certificates, kubeconfigs, logs
	// and etcd's data; Close removes it.
	Dir string
	// BinDir is where kube-apiserver was found (and kubectl is looked for).
	BinDir string
	// CACertFile and CAKeyFile are the cluster CA, trusted for serving and
	// client certificates (for a later kubelet or controller-manager).
	CACertFile, CAKeyFile string
	// CAData is the CA certificate, PEM.
	CAData []byte
	// ServiceAccountKeyFile is the private key service account tokens are
	// signed with (kube-controller-manager's --service-account-private-key-file).
	ServiceAccountKeyFile string
	// APIServerLog and EtcdLog are the processes' output.
	APIServerLog, EtcdLog string

	ca        *CA
	etcd      *proc
	apiserver *proc
	logf      func(string, ...any)

	mu      sync.Mutex
	mapper  *restmapper.DeferredDiscoveryRESTMapper
	fileSeq int

	closeOnce sync.Once
	closeErr  error
}

// StartT starts an Env for a test and closes it when the test ends; when the
// test has failed by then, the apiserver's log tail is logged first. Without
// the binaries the test is skipped, unless $CI is set: then it fails.
func StartT(t testing.TB, opts Options) *Env {
	t.Helper()
	if opts.Logf == nil {
		opts.Logf = t.Logf
	}
	env, err := Start(context.Background(), opts)
	if err != nil {
		if errors.Is(err, ErrMissingBinaries) && os.Getenv("CI") == "" {
			t.Skipf("kubeenv: %v (with CI set this fails instead)", err)
		}
		t.Fatalf("kubeenv: %v", err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("kubeenv: kube-apiserver log tail (%s):\n%s", env.APIServerLog, env.APIServerLogTail(80))
		}
		if err := env.Close(); err != nil {
			t.Errorf("kubeenv: close: %v", err)
		}
	})
	return env
}

// Start starts etcd and kube-apiserver on 127.0.0.1 and returns when the
// apiserver is ready (/readyz) and the "default" namespace and its default
// ServiceAccount exist. ctx bounds the start only; the processes run until
// Close. On error nothing is left running.
func Start(ctx context.Context, opts Options) (_ *Env, err error) {
	timeout := opts.StartTimeout
	if timeout <= 0 {
		timeout = 90 * time.Second
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	logf := opts.Logf
	if logf == nil {
		logf = func(string, ...any) {}
	}

	binDir, apiserverBin, etcdBin, err := findBinaries(opts)
	if err != nil {
		return nil, err
	}

	dir, err := os.MkdirTemp("", "kubeenv-")
	if err != nil {
		return nil, err
	}
	e := &Env{
		Dir:                   dir,
		BinDir:                binDir,
		CACertFile:            filepath.Join(dir, "ca.crt"),
		CAKeyFile:             filepath.Join(dir, "ca.key"),
		ServiceAccountKeyFile: filepath.Join(dir, "sa.key"),
		APIServerLog:          filepath.Join(dir, "kube-apiserver.log"),
		EtcdLog:               filepath.Join(dir, "etcd.log"),
		logf:                  logf,
	}
	defer func() {
		if err != nil {
			_ = e.Close()
		}
	}()

	started := time.Now()
	if err := e.writeCerts(); err != nil {
		return nil, fmt.Errorf("certificates: %w", err)
	}
	if err := e.startEtcd(ctx, etcdBin); err != nil {
		return nil, err
	}
	logf("kubeenv: etcd %s ready at %s after %v", etcdBin, e.EtcdURL, time.Since(started).Round(time.Millisecond))
	if err := e.startAPIServer(ctx, apiserverBin, opts.APIServerArgs); err != nil {
		return nil, err
	}
	if err := e.bootstrap(ctx); err != nil {
		return nil, fmt.Errorf("%w\nkube-apiserver log tail:\n%s", err, e.APIServerLogTail(40))
	}
	logf("kubeenv: kube-apiserver %s ready at %s after %v (dir %s)", apiserverBin, e.URL, time.Since(started).Round(time.Millisecond), dir)
	return e, nil
}

// Close stops the apiserver and etcd, waits for them to exit and removes Dir.
// It is safe to call more than once.
func (e *Env) Close() error {
	e.closeOnce.Do(func() {
		var errs []error
		if e.apiserver != nil {
			errs = append(errs, e.apiserver.stop(15*time.Second))
		}
		if e.etcd != nil {
			errs = append(errs, e.etcd.stop(10*time.Second))
		}
		if e.Dir != "" {
			errs = append(errs, os.RemoveAll(e.Dir))
		}
		e.closeErr = errors.Join(errs...)
	})
	return e.closeErr
}

// APIServerLogTail returns the last n lines of the apiserver's output.
func (e *Env) APIServerLogTail(n int) string { return tailFile(e.APIServerLog, n) }

// EtcdLogTail returns the last n lines of etcd's output.
func (e *Env) EtcdLogTail(n int) string { return tailFile(e.EtcdLog, n) }

// PIDs returns the process ids of the apiserver and etcd (0 when not
// started).
func (e *Env) PIDs() (apiserver, etcd int) {
	if e.apiserver != nil {
		apiserver = e.apiserver.cmd.Process.Pid
	}
	if e.etcd != nil {
		etcd = e.etcd.cmd.Process.Pid
	}
	return apiserver, etcd
}

// --- binaries ---------------------------------------------------------------

func findBinaries(opts Options) (binDir, apiserver, etcd string, err error) {
	binDir = opts.BinDir
	if binDir == "" {
		binDir = os.Getenv(EnvBinDir)
	}
	if binDir == "" {
		root, rerr := harness.RepoRoot()
		if rerr != nil {
			return "", "", "", fmt.Errorf("%w: no BinDir, no $%s, and %v", ErrMissingBinaries, EnvBinDir, rerr)
		}
		binDir = filepath.Join(root, "bin")
	}
	binDir, _ = filepath.Abs(binDir)
	var missing []string
	apiserver = filepath.Join(binDir, "kube-apiserver")
	if !isExecutable(apiserver) {
		missing = append(missing, apiserver)
	}

	etcd = opts.EtcdPath
	if etcd == "" {
		etcd = os.Getenv(EnvEtcdBin)
	}
	if etcd == "" {
		for _, c := range []string{filepath.Join(binDir, "etcd"), "/usr/bin/etcd"} {
			if isExecutable(c) {
				etcd = c
				break
			}
		}
	}
	if etcd == "" {
		if p, lerr := exec.LookPath("etcd"); lerr == nil {
			etcd = p
		}
	}
	if etcd == "" || !isExecutable(etcd) {
		if etcd == "" {
			etcd = "etcd (/usr/bin/etcd, $PATH)"
		}
		missing = append(missing, etcd)
	}
	if len(missing) > 0 {
		return "", "", "", fmt.Errorf("%w: missing %s; build with `make kube-tools` or `test/kube/build.sh bin kube-apiserver kubectl` (installs etcd-server), or set $%s/$%s",
			ErrMissingBinaries, strings.Join(missing, ", "), EnvBinDir, EnvEtcdBin)
	}
	return binDir, apiserver, etcd, nil
}

func isExecutable(p string) bool {
	fi, err := os.Stat(p)
	return err == nil && fi.Mode().IsRegular() && fi.Mode()&0o111 != 0
}

// --- certificates -----------------------------------------------------------

func (e *Env) writeCerts() error {
	c, err := NewCA()
	if err != nil {
		return err
	}
	e.ca = c
	e.CAData = c.CertPEM
	serviceIP := net.IPv4(10, 0, 0, 1) // first address of ServiceClusterIPRange: the kubernetes Service
	serving, servingKey, err := c.Issue("kube-apiserver", nil,
		[]string{"localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc", "kubernetes.default.svc.cluster.local"},
		[]net.IP{net.IPv4(127, 0, 0, 1), net.IPv6loopback, serviceIP}, x509.ExtKeyUsageServerAuth)
	if err != nil {
		return err
	}
	kubeletClient, kubeletClientKey, err := c.Issue("kube-apiserver-kubelet-client", []string{"system:masters"}, nil, nil, x509.ExtKeyUsageClientAuth)
	if err != nil {
		return err
	}
	for _, f := range []struct {
		name string
		data []byte
		mode os.FileMode
	}{
		{"ca.crt", c.CertPEM, 0o644},
		{"ca.key", c.KeyPEM, 0o600},
		{"apiserver.crt", serving, 0o644},
		{"apiserver.key", servingKey, 0o600},
		{"apiserver-kubelet-client.crt", kubeletClient, 0o644},
		{"apiserver-kubelet-client.key", kubeletClientKey, 0o600},
	} {
		if err := os.WriteFile(filepath.Join(e.Dir, f.name), f.data, f.mode); err != nil {
			return err
		}
	}
	return writeServiceAccountKeys(e.ServiceAccountKeyFile, filepath.Join(e.Dir, "sa.pub"))
}

// --- etcd -------------------------------------------------------------------

func (e *Env) startEtcd(ctx context.Context, bin string) error {
	var lastErr error
	for attempt := 0; attempt < 3; attempt++ {
		clientPort, err := harness.FreePort()
		if err != nil {
			return err
		}
		peerPort, err := harness.FreePort()
		if err != nil {
			return err
		}
		dataDir := filepath.Join(e.Dir, "etcd")
		if err := os.RemoveAll(dataDir); err != nil {
			return err
		}
		clientURL := "http://127.0.0.1:" + strconv.Itoa(clientPort)
		peerURL := "http://127.0.0.1:" + strconv.Itoa(peerPort)
		args := []string{
			"--name=kubeenv",
			"--data-dir=" + dataDir,
			"--listen-client-urls=" + clientURL,
			"--advertise-client-urls=" + clientURL,
			"--listen-peer-urls=" + peerURL,
			"--initial-advertise-peer-urls=" + peerURL,
			"--initial-cluster=kubeenv=" + peerURL,
			"--initial-cluster-state=new",
			// A throwaway store: a short heartbeat for a quick first
			// election, a small quota (the file is sparse anyway).
			"--heartbeat-interval=50",
			"--election-timeout=500",
			"--quota-backend-bytes=" + strconv.Itoa(256<<20),
			"--snapshot-count=10000",
			"--logger=zap",
			"--log-outputs=stderr",
			"--log-level=warn",
		}
		var env []string
		switch runtime.GOARCH {
		case "amd64", "ppc64le", "s390x":
		default:
			env = append(env, "ETCD_UNSUPPORTED_ARCH="+runtime.GOARCH) // etcd 3.4 asks for it on arm64
		}
		p, portTaken, err := startReady(ctx, "etcd", bin, args, e.EtcdLog, env, 5*time.Second, 30, func(ctx context.Context) error {
			return etcdHealthy(ctx, clientURL)
		})
		if err == nil {
			e.etcd, e.EtcdURL = p, clientURL
			return nil
		}
		if lastErr = err; !portTaken {
			return lastErr
		}
	}
	return lastErr
}

// startReady starts bin (logging to logPath) and waits until ready
// passes. A process that does not get there is stopped (waiting up to
// grace) and the error carries the last tail lines of its log; portTaken
// says it exited because its port was in use, so that the caller tries
// other ports.
func startReady(ctx context.Context, name, bin string, args []string, logPath string, env []string,
	grace time.Duration, tail int, ready func(context.Context) error) (p *proc, portTaken bool, err error) {
	p, err = startProc(name, bin, args, logPath, env)
	if err != nil {
		return nil, false, err
	}
	if err = waitFor(ctx, p, ready); err == nil {
		return p, false, nil
	}
	_ = p.stop(grace)
	return nil, p.exitedFor("address already in use"),
		fmt.Errorf("%s did not become ready: %w\n%s log tail:\n%s", name, err, name, tailFile(logPath, tail))
}

func etcdHealthy(ctx context.Context, clientURL string) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, clientURL+"/health", nil)
	if err != nil {
		return err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
	if resp.StatusCode != http.StatusOK || !bytes.Contains(body, []byte(`"true"`)) {
		return fmt.Errorf("etcd /health: %s %s", resp.Status, bytes.TrimSpace(body))
	}
	return nil
}

// --- kube-apiserver -----------------------------------------------------------

// apiServerArgs are the flags of every Env's apiserver.
func (e *Env) apiServerArgs(port int) []string {
	f := func(name string) string { return filepath.Join(e.Dir, name) }
	return []string{
		// Reachable on loopback only.
		"--bind-address=127.0.0.1",
		"--advertise-address=127.0.0.1",
		"--secure-port=" + strconv.Itoa(port),
		"--tls-cert-file=" + f("apiserver.crt"),
		"--tls-private-key-file=" + f("apiserver.key"),
		"--cert-dir=" + e.Dir,
		"--etcd-servers=" + e.EtcdURL,
		// Authentication: client certificates from our CA, and service
		// account tokens signed with our key (the TokenRequest API).
		"--client-ca-file=" + e.CACertFile,
		"--service-account-issuer=" + ServiceAccountIssuer,
		"--service-account-key-file=" + f("sa.pub"),
		"--service-account-signing-key-file=" + e.ServiceAccountKeyFile,
		// Authorization as in a real cluster: RBAC for users and service
		// accounts, Node for kubelets.
		"--authorization-mode=Node,RBAC",
		// The default admission plugins, plus NodeRestriction as clusters run.
		"--enable-admission-plugins=NodeRestriction",
		"--allow-privileged=true", // the driver's DaemonSet is privileged
		"--service-cluster-ip-range=" + ServiceClusterIPRange,
		// For a later kubelet (end-to-end): logs/exec reach it by host name.
		"--kubelet-client-certificate=" + f("apiserver-kubelet-client.crt"),
		"--kubelet-client-key=" + f("apiserver-kubelet-client.key"),
		"--kubelet-preferred-address-types=Hostname,InternalIP",
		// Lighter and quicker for a test.
		"--profiling=false",
		"--enable-priority-and-fairness=false",
		"--event-ttl=30m",
		// The kubernetes Service cannot have a loopback endpoint: without
		// this the apiserver logs an error every 10s. An end-to-end cluster
		// whose pods reach the apiserver by Service overrides it together
		// with --advertise-address.
		"--endpoint-reconciler-type=none",
	}
}

func (e *Env) startAPIServer(ctx context.Context, bin string, extra []string) error {
	var lastErr error
	for attempt := 0; attempt < 3; attempt++ {
		port, err := harness.FreePort()
		if err != nil {
			return err
		}
		e.URL = "https://127.0.0.1:" + strconv.Itoa(port)
		if err := e.makeAdminClients(); err != nil {
			return err
		}
		args := append(e.apiServerArgs(port), extra...)
		p, portTaken, err := startReady(ctx, "kube-apiserver", bin, args, e.APIServerLog, nil, 10*time.Second, 40, e.ready)
		if err == nil {
			e.apiserver = p
			return nil
		}
		if lastErr = err; !portTaken {
			return lastErr
		}
	}
	return lastErr
}

func (e *Env) makeAdminClients() error {
	cert, key, err := e.ca.Issue(AdminUser, []string{"system:masters"}, nil, nil, x509.ExtKeyUsageClientAuth)
	if err != nil {
		return err
	}
	e.Config = &rest.Config{
		Host: e.URL,
		TLSClientConfig: rest.TLSClientConfig{
			CAData:   e.CAData,
			CertData: cert,
			KeyData:  key,
		},
		QPS:   100,
		Burst: 200,
	}
	if e.Client, err = kubernetes.NewForConfig(e.Config); err != nil {
		return err
	}
	if e.Dynamic, err = dynamic.NewForConfig(e.Config); err != nil {
		return err
	}
	e.mapper = restmapper.NewDeferredDiscoveryRESTMapper(memory.NewMemCacheClient(e.Client.Discovery()))
	e.AdminKubeconfig = filepath.Join(e.Dir, "admin.kubeconfig")
	return e.writeKubeconfig(e.AdminKubeconfig, AdminUser, clientcmdv1.AuthInfo{
		ClientCertificateData: cert,
		ClientKeyData:         key,
	})
}

// ready reports whether /readyz answers ok.
func (e *Env) ready(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	body, err := e.Client.Discovery().RESTClient().Get().AbsPath("/readyz").DoRaw(ctx)
	if err != nil {
		return fmt.Errorf("/readyz: %w", err)
	}
	if strings.TrimSpace(string(body)) != "ok" {
		return fmt.Errorf("/readyz: %s", body)
	}
	return nil
}

// bootstrap waits for the "default" namespace (the apiserver makes it) and
// gives it the default ServiceAccount the missing controller-manager would
// make, so pods can be created in it.
func (e *Env) bootstrap(ctx context.Context) error {
	for {
		_, err := e.Client.CoreV1().Namespaces().Get(ctx, metav1.NamespaceDefault, metav1.GetOptions{})
		if err == nil {
			break
		}
		if !apierrors.IsNotFound(err) {
			return fmt.Errorf("namespace default: %w", err)
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("namespace default never appeared: %w", ctx.Err())
		case <-time.After(50 * time.Millisecond):
		}
	}
	return e.ensureServiceAccount(ctx, metav1.NamespaceDefault, "default")
}

// --- identities ---------------------------------------------------------------

// CreateNamespace creates a namespace and its "default" ServiceAccount (which
// the controller-manager would make in a full cluster); existing ones are
// kept.
func (e *Env) CreateNamespace(ctx context.Context, name string) error {
	_, err := e.Client.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name}}, metav1.CreateOptions{})
	if err != nil && !apierrors.IsAlreadyExists(err) {
		return fmt.Errorf("create namespace %s: %w", name, err)
	}
	return e.ensureServiceAccount(ctx, name, "default")
}

func (e *Env) ensureServiceAccount(ctx context.Context, namespace, name string) error {
	_, err := e.Client.CoreV1().ServiceAccounts(namespace).Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: name}}, metav1.CreateOptions{})
	if err != nil && !apierrors.IsAlreadyExists(err) {
		return fmt.Errorf("create serviceaccount %s/%s: %w", namespace, name, err)
	}
	return nil
}

// ServiceAccountToken returns a token for the existing ServiceAccount
// namespace/name from the TokenRequest API, valid for an hour.
func (e *Env) ServiceAccountToken(ctx context.Context, namespace, name string) (string, error) {
	expiry := int64(3600)
	tr, err := e.Client.CoreV1().ServiceAccounts(namespace).CreateToken(ctx, name, &authenticationv1.TokenRequest{
		Spec: authenticationv1.TokenRequestSpec{ExpirationSeconds: &expiry},
	}, metav1.CreateOptions{})
	if err != nil {
		return "", fmt.Errorf("token for serviceaccount %s/%s: %w", namespace, name, err)
	}
	return tr.Status.Token, nil
}

// RESTConfigForServiceAccount returns a client configuration that
// authenticates as the ServiceAccount namespace/name with a TokenRequest
// token: it has exactly the permissions RBAC grants that account.
func (e *Env) RESTConfigForServiceAccount(ctx context.Context, namespace, name string) (*rest.Config, error) {
	token, err := e.ServiceAccountToken(ctx, namespace, name)
	if err != nil {
		return nil, err
	}
	return &rest.Config{
		Host:            e.URL,
		BearerToken:     token,
		TLSClientConfig: rest.TLSClientConfig{CAData: e.CAData},
	}, nil
}

// KubeconfigForServiceAccount writes a kubeconfig file (under Dir) that
// authenticates as the ServiceAccount namespace/name with a TokenRequest
// token, and returns its path: give it to the driver as --kubeconfig to run
// it as its real ServiceAccount.
func (e *Env) KubeconfigForServiceAccount(ctx context.Context, namespace, name string) (string, error) {
	token, err := e.ServiceAccountToken(ctx, namespace, name)
	if err != nil {
		return "", err
	}
	path := e.newFile("sa-" + namespace + "-" + name)
	user := "system:serviceaccount:" + namespace + ":" + name
	if err := e.writeKubeconfig(path, user, clientcmdv1.AuthInfo{Token: token}); err != nil {
		return "", err
	}
	return path, nil
}

// RESTConfigForUser returns a client configuration with a client certificate
// for user in groups (e.g. "system:node:n1" in "system:nodes").
func (e *Env) RESTConfigForUser(user string, groups ...string) (*rest.Config, error) {
	cert, key, err := e.ca.Issue(user, groups, nil, nil, x509.ExtKeyUsageClientAuth)
	if err != nil {
		return nil, err
	}
	return &rest.Config{
		Host:            e.URL,
		TLSClientConfig: rest.TLSClientConfig{CAData: e.CAData, CertData: cert, KeyData: key},
	}, nil
}

// KubeconfigForUser writes a kubeconfig file (under Dir) with a client
// certificate for user in groups, and returns its path.
func (e *Env) KubeconfigForUser(user string, groups ...string) (string, error) {
	cert, key, err := e.ca.Issue(user, groups, nil, nil, x509.ExtKeyUsageClientAuth)
	if err != nil {
		return "", err
	}
	path := e.newFile("user-" + user)
	if err := e.writeKubeconfig(path, user, clientcmdv1.AuthInfo{ClientCertificateData: cert, ClientKeyData: key}); err != nil {
		return "", err
	}
	return path, nil
}

func (e *Env) newFile(base string) string {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.fileSeq++
	clean := strings.Map(func(r rune) rune {
		if r == '/' || r == ':' || r == os.PathSeparator {
			return '_'
		}
		return r
	}, base)
	return filepath.Join(e.Dir, fmt.Sprintf("%s-%d.kubeconfig", clean, e.fileSeq))
}

func (e *Env) writeKubeconfig(path, user string, auth clientcmdv1.AuthInfo) error {
	cfg := clientcmdv1.Config{
		APIVersion: "v1",
		Kind:       "Config",
		Clusters: []clientcmdv1.NamedCluster{{
			Name:    "kubeenv",
			Cluster: clientcmdv1.Cluster{Server: e.URL, CertificateAuthorityData: e.CAData},
		}},
		AuthInfos: []clientcmdv1.NamedAuthInfo{{Name: user, AuthInfo: auth}},
		Contexts: []clientcmdv1.NamedContext{{
			Name:    "kubeenv",
			Context: clientcmdv1.Context{Cluster: "kubeenv", AuthInfo: user, Namespace: metav1.NamespaceDefault},
		}},
		CurrentContext: "kubeenv",
	}
	b, err := yaml.Marshal(cfg)
	if err != nil {
		return err
	}
	return os.WriteFile(path, b, 0o600)
}

// --- kubectl -------------------------------------------------------------------

// Kubectl runs BinDir/kubectl as the admin (--kubeconfig=AdminKubeconfig)
// and returns its standard output; an error carries its standard error.
func (e *Env) Kubectl(ctx context.Context, args ...string) ([]byte, error) {
	bin := filepath.Join(e.BinDir, "kubectl")
	if !isExecutable(bin) {
		return nil, fmt.Errorf("%s not found: build it with `test/kube/build.sh %s kubectl`", bin, e.BinDir)
	}
	cmd := exec.CommandContext(ctx, bin, append([]string{"--kubeconfig=" + e.AdminKubeconfig}, args...)...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return stdout.Bytes(), fmt.Errorf("kubectl %s: %w: %s", strings.Join(args, " "), err, bytes.TrimSpace(stderr.Bytes()))
	}
	return stdout.Bytes(), nil
}

// --- processes -------------------------------------------------------------------

type proc struct {
	name    string
	cmd     *exec.Cmd
	logPath string
	logFile *os.File
	done    chan struct{}
	waitErr error
}

func startProc(name, bin string, args []string, logPath string, env []string) (*proc, error) {
	lf, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, err
	}
	fmt.Fprintf(lf, "+ %s %s\n", bin, strings.Join(args, " "))
	cmd := exec.Command(bin, args...)
	cmd.Stdout, cmd.Stderr = lf, lf
	cmd.Env = append(os.Environ(), env...)
	cmd.SysProcAttr = sysProcAttr()
	if err := cmd.Start(); err != nil {
		lf.Close()
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	p := &proc{name: name, cmd: cmd, logPath: logPath, logFile: lf, done: make(chan struct{})}
	go func() {
		p.waitErr = cmd.Wait()
		lf.Close()
		close(p.done)
	}()
	return p, nil
}

// stop sends SIGTERM to the process group, then SIGKILL after grace, and
// waits for the process to be reaped.
func (p *proc) stop(grace time.Duration) error {
	select {
	case <-p.done:
		return nil
	default:
	}
	pid := p.cmd.Process.Pid
	_ = syscall.Kill(-pid, syscall.SIGTERM)
	select {
	case <-p.done:
		return nil
	case <-time.After(grace):
	}
	_ = syscall.Kill(-pid, syscall.SIGKILL)
	select {
	case <-p.done:
		return fmt.Errorf("%s (pid %d) ignored SIGTERM for %v and was killed", p.name, pid, grace)
	case <-time.After(10 * time.Second):
		return fmt.Errorf("%s (pid %d) survives SIGKILL", p.name, pid)
	}
}

func (p *proc) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// exitedFor reports whether the process has exited with msg in its log.
func (p *proc) exitedFor(msg string) bool {
	if !p.exited() {
		return false
	}
	b, _ := os.ReadFile(p.logPath)
	return bytes.Contains(b, []byte(msg))
}

// waitFor polls check until it succeeds, the process exits, or ctx ends.
func waitFor(ctx context.Context, p *proc, check func(context.Context) error) error {
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	var last error
	for {
		if last = check(ctx); last == nil {
			return nil
		}
		select {
		case <-p.done:
			return fmt.Errorf("%s exited: %v", p.name, p.waitErr)
		case <-ctx.Done():
			return fmt.Errorf("%w (last: %v)", ctx.Err(), last)
		case <-tick.C:
		}
	}
}

func tailFile(path string, n int) string {
	f, err := os.Open(path)
	if err != nil {
		return fmt.Sprintf("(no log: %v)", err)
	}
	defer f.Close()
	const max = 256 << 10
	if fi, err := f.Stat(); err == nil && fi.Size() > max {
		_, _ = f.Seek(fi.Size()-max, io.SeekStart)
	}
	b, _ := io.ReadAll(f)
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
