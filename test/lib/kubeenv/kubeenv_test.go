package kubeenv_test

import (
	"context"
	"errors"
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/wasm-csi/wasm-csi/test/lib/kubeenv"
)

func TestAdminClient(t *testing.T) {
	t.Parallel()
	env := kubeenv.StartT(t, kubeenv.Options{})
	ctx := context.Background()

	nss, err := env.Client.CoreV1().Namespaces().List(ctx, metav1.ListOptions{})
	if err != nil {
		t.Fatalf("list namespaces: %v", err)
	}
	names := map[string]bool{}
	for _, ns := range nss.Items {
		names[ns.Name] = true
	}
	for _, want := range []string{"default", "kube-system"} {
		if !names[want] {
			t.Errorf("namespace %s missing from %v", want, names)
		}
	}
	if _, err := env.Client.CoreV1().ServiceAccounts("default").Get(ctx, "default", metav1.GetOptions{}); err != nil {
		t.Errorf("default serviceaccount: %v", err)
	}

	// The admin kubeconfig file works as a client-go user would load it.
	cfg, err := clientcmd.BuildConfigFromFlags("", env.AdminKubeconfig)
	if err != nil {
		t.Fatalf("load %s: %v", env.AdminKubeconfig, err)
	}
	cs := kubernetes.NewForConfigOrDie(cfg)
	v, err := cs.Discovery().ServerVersion()
	if err != nil {
		t.Fatalf("server version: %v", err)
	}
	t.Logf("server version %s", v.GitVersion)
	if v.GitVersion == "" || strings.HasPrefix(v.GitVersion, "v0.0.0") {
		t.Errorf("apiserver reports version %q: build it with the version ldflags (test/kube/build.sh)", v.GitVersion)
	}

	// And so does kubectl, when it is built.
	if _, err := os.Stat(filepath.Join(env.BinDir, "kubectl")); err == nil {
		out, err := env.Kubectl(ctx, "get", "namespace", "kube-system", "-o", "name")
		if err != nil || strings.TrimSpace(string(out)) != "namespace/kube-system" {
			t.Errorf("kubectl get namespace: %q, %v", out, err)
		}
	}
}

// rbacYAML is a driver-like identity: a ServiceAccount bound to a ClusterRole
// that may only get secrets. The CSIDriver and DaemonSet check that storage
// and apps objects apply too.
const rbacYAML = `
apiVersion: v1
kind: ServiceAccount
metadata:
  name: reader
  namespace: creds
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata:
  name: kubeenv-test-secret-getter
rules:
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get"]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata:
  name: kubeenv-test-secret-getter
roleRef:
  apiGroup: rbac.authorization.k8s.io
  kind: ClusterRole
  name: kubeenv-test-secret-getter
subjects:
- kind: ServiceAccount
  name: reader
  namespace: creds
---
apiVersion: v1
kind: Namespace
metadata:
  name: creds
---
apiVersion: v1
kind: Secret
metadata:
  name: pull
  namespace: creds
type: kubernetes.io/dockerconfigjson
stringData:
  .dockerconfigjson: '{"auths":{"registry.example":{"auth":"dTpw"}}}'
---
apiVersion: storage.k8s.io/v1
kind: CSIDriver
metadata:
  name: wasm.csi.dev
spec:
  attachRequired: false
  podInfoOnMount: true
  volumeLifecycleModes: [Ephemeral]
---
apiVersion: apps/v1
kind: DaemonSet
metadata:
  name: ds
  namespace: creds
spec:
  selector:
    matchLabels: {app: ds}
  template:
    metadata:
      labels: {app: ds}
    spec:
      serviceAccountName: reader
      containers:
      - name: c
        image: example.invalid/driver:1
`

func TestRBACIsEnforced(t *testing.T) {
	t.Parallel()
	env := kubeenv.StartT(t, kubeenv.Options{})
	ctx := context.Background()

	objs, err := env.ApplyYAML(ctx, []byte(rbacYAML))
	if err != nil {
		t.Fatalf("apply: %v", err)
	}
	if len(objs) != 7 || objs[0].GetKind() != "Namespace" {
		t.Fatalf("applied %d objects, first %s; want 7, the Namespace first", len(objs), objs[0].GetKind())
	}
	// Applying again is a no-op, not an error.
	if _, err := env.ApplyYAML(ctx, []byte(rbacYAML)); err != nil {
		t.Fatalf("apply again: %v", err)
	}

	path, err := env.KubeconfigForServiceAccount(ctx, "creds", "reader")
	if err != nil {
		t.Fatal(err)
	}
	cfg, err := clientcmd.BuildConfigFromFlags("", path)
	if err != nil {
		t.Fatalf("load %s: %v", path, err)
	}
	sa := kubernetes.NewForConfigOrDie(cfg)

	// The authorizer learns of a new binding through its informers: allow
	// it a moment.
	var secret *corev1.Secret
	deadline := time.Now().Add(15 * time.Second)
	for {
		secret, err = sa.CoreV1().Secrets("creds").Get(ctx, "pull", metav1.GetOptions{})
		if err == nil || !apierrors.IsForbidden(err) || time.Now().After(deadline) {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if err != nil {
		t.Fatalf("service account get secret: %v", err)
	}
	if secret.Type != corev1.SecretTypeDockerConfigJson || len(secret.Data[corev1.DockerConfigJsonKey]) == 0 {
		t.Errorf("secret: type %s, data %v", secret.Type, secret.Data)
	}

	_, err = sa.CoreV1().Secrets("creds").List(ctx, metav1.ListOptions{})
	if !apierrors.IsForbidden(err) {
		t.Errorf("service account list secrets: got %v, want Forbidden", err)
	}
	_, err = sa.CoreV1().Pods("creds").Get(ctx, "any", metav1.GetOptions{})
	if !apierrors.IsForbidden(err) {
		t.Errorf("service account get pod: got %v, want Forbidden", err)
	}
	_, err = sa.CoreV1().Secrets("creds").Get(ctx, "missing", metav1.GetOptions{})
	if !apierrors.IsNotFound(err) {
		t.Errorf("service account get missing secret: got %v, want NotFound", err)
	}

	// The same identity as a rest.Config.
	rc, err := env.RESTConfigForServiceAccount(ctx, "creds", "reader")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := kubernetes.NewForConfigOrDie(rc).CoreV1().Secrets("creds").Get(ctx, "pull", metav1.GetOptions{}); err != nil {
		t.Errorf("rest config: get secret: %v", err)
	}

	// A user certificate with no bindings gets nothing; a node gets what
	// the Node authorizer gives it.
	nobody, err := env.RESTConfigForUser("nobody")
	if err != nil {
		t.Fatal(err)
	}
	_, err = kubernetes.NewForConfigOrDie(nobody).CoreV1().Secrets("creds").Get(ctx, "pull", metav1.GetOptions{})
	if !apierrors.IsForbidden(err) {
		t.Errorf("user nobody get secret: got %v, want Forbidden", err)
	}
	node, err := env.RESTConfigForUser("system:node:n1", "system:nodes")
	if err != nil {
		t.Fatal(err)
	}
	_, err = kubernetes.NewForConfigOrDie(node).CoreV1().Secrets("creds").Get(ctx, "pull", metav1.GetOptions{})
	if !apierrors.IsForbidden(err) {
		t.Errorf("node n1 (no pod uses the secret) get secret: got %v, want Forbidden", err)
	}

	if err := env.CreateNamespace(ctx, "other"); err != nil {
		t.Fatal(err)
	}
	if _, err := env.Client.CoreV1().ServiceAccounts("other").Get(ctx, "default", metav1.GetOptions{}); err != nil {
		t.Errorf("CreateNamespace made no default serviceaccount: %v", err)
	}
}

func TestCloseLeavesNothingRunning(t *testing.T) {
	env := kubeenv.StartT(t, kubeenv.Options{})
	apiPID, etcdPID := env.PIDs()
	if apiPID == 0 || etcdPID == 0 {
		t.Fatalf("pids %d %d", apiPID, etcdPID)
	}
	apiAddr := strings.TrimPrefix(env.URL, "https://")
	etcdAddr := strings.TrimPrefix(env.EtcdURL, "http://")
	if err := env.Close(); err != nil {
		t.Fatalf("close: %v", err)
	}
	assertGone(t, env.Dir, apiPID, etcdPID)
	for _, addr := range []string{apiAddr, etcdAddr} {
		if c, err := net.DialTimeout("tcp", addr, time.Second); err == nil {
			c.Close()
			t.Errorf("%s still accepts connections", addr)
		}
	}
	if err := env.Close(); err != nil {
		t.Errorf("second close: %v", err)
	}
}

func TestFailedStartReportsLogAndCleansUp(t *testing.T) {
	tmp := t.TempDir()
	t.Setenv("TMPDIR", tmp) // Start's directory goes here
	_, err := kubeenv.Start(context.Background(), kubeenv.Options{APIServerArgs: []string{"--no-such-flag=1"}})
	if errors.Is(err, kubeenv.ErrMissingBinaries) {
		if os.Getenv("CI") == "" {
			t.Skipf("kubeenv: %v (with CI set this fails instead)", err)
		}
		t.Fatalf("kubeenv: %v", err)
	}
	if err == nil {
		t.Fatal("Start with a bad apiserver flag succeeded")
	}
	if !strings.Contains(err.Error(), "unknown flag: --no-such-flag") {
		t.Errorf("error does not show the apiserver's log: %v", err)
	}
	left, _ := filepath.Glob(filepath.Join(tmp, "*"))
	for _, d := range left {
		t.Errorf("Start left %s behind", d)
		assertGone(t, d)
	}
}

// assertGone checks that dir is removed and that no process remains with
// one of pids or with dir on its command line.
func assertGone(t *testing.T, dir string, pids ...int) {
	t.Helper()
	if _, err := os.Stat(dir); !os.IsNotExist(err) {
		t.Errorf("%s still exists (%v)", dir, err)
	}
	for _, pid := range pids {
		if err := syscall.Kill(pid, 0); !errors.Is(err, syscall.ESRCH) {
			t.Errorf("process %d still exists (kill 0: %v)", pid, err)
		}
	}
	procs, _ := filepath.Glob("/proc/[0-9]*/cmdline")
	for _, p := range procs {
		b, err := os.ReadFile(p)
		if err == nil && strings.Contains(string(b), dir) {
			t.Errorf("%s: a process still runs with %s: %q", filepath.Dir(p), dir, strings.ReplaceAll(string(b), "\x00", " "))
		}
	}
}
