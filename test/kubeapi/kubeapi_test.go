// Package kubeapi tests the driver's Kubernetes paths (pull secrets, the
// confused-deputy check, pod events, RBAC) against a real kube-apiserver
// and etcd, with the driver running under the ServiceAccount and
// ClusterRole from manifests/: a permission missing there fails here.
//
// Needs: root (the driver makes real mounts), a real kube-apiserver, kubectl
// and etcd (test/lib/kubeenv: bin/kube-apiserver from `make tools`, Debian's
// etcd) and distribution's registry (bin/registry).
package kubeapi

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/wasm-csi/wasm-csi/test/lib/harness"
	"github.com/wasm-csi/wasm-csi/test/lib/kubeenv"
	"github.com/wasm-csi/wasm-csi/test/lib/registrytest"
	"github.com/wasm-csi/wasm-csi/test/lib/wasmgen"
)

const (
	driverNS = "wasm-csi"
	driverSA = "wasm-csi-node"
	user     = "alice"
	password = "s3cret-do-not-log"
)

type fixture struct {
	env     *kubeenv.Env
	reg     *registrytest.Registry
	daemon  *harness.Daemon
	kubelet *harness.Kubelet
	image   string
	module  []byte
}

func repoPath(t *testing.T, rel string) string {
	t.Helper()
	root, err := harness.RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	return filepath.Join(root, rel)
}

// setup starts the apiserver, applies the manifests' RBAC, a registry that
// requires credentials with one module pushed, and the driver running as
// its ServiceAccount (or as sa, when given, for RBAC variations).
func setup(t *testing.T, bin string, env *kubeenv.Env, sa string) *fixture {
	t.Helper()
	ctx := context.Background()
	reg := registrytest.StartT(t, registrytest.Options{Htpasswd: map[string]string{user: password}})
	module := wasmgen.ProxyWasm(wasmgen.Options{Message: "private " + t.Name()})
	repo := "private/" + strings.Trim(regexp.MustCompile(`[^a-z0-9]+`).ReplaceAllString(strings.ToLower(t.Name()), "-"), "-")
	if _, err := registrytest.PushWasm(ctx, reg.Host()+"/"+repo+":1.0", module, registrytest.LayoutCNCF,
		registrytest.WithBasicAuth(user, password)); err != nil {
		t.Fatal(err)
	}
	kc, err := env.KubeconfigForServiceAccount(ctx, driverNS, sa)
	if err != nil {
		t.Fatal(err)
	}
	d := harness.StartDaemon(t, bin, harness.DaemonOptions{Args: []string{
		"--insecure-registry=" + reg.ProxyHost(), "--kubeconfig=" + kc,
	}})
	return &fixture{env: env, reg: reg, daemon: d, kubelet: harness.NewKubelet(t), image: reg.ProxyHost() + "/" + repo + ":1.0", module: module}
}

func dockerConfigJSON(host, u, p string) []byte {
	b, _ := json.Marshal(map[string]any{"auths": map[string]any{
		host: map[string]string{"auth": base64.StdEncoding.EncodeToString([]byte(u + ":" + p))},
	}})
	return b
}

func (f *fixture) secret(t *testing.T, ns, name string, typ corev1.SecretType, data map[string][]byte) {
	t.Helper()
	_, err := f.env.Client.CoreV1().Secrets(ns).Create(context.Background(), &corev1.Secret{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns}, Type: typ, Data: data,
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
}

// pod creates a pod object (nothing runs it: there is no kubelet) and
// returns it as kubelet describes it to the driver.
func (f *fixture) pod(t *testing.T, ns, name, sa string, secrets ...string) harness.Pod {
	t.Helper()
	p := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns},
		Spec: corev1.PodSpec{
			ServiceAccountName:           sa,
			AutomountServiceAccountToken: new(bool),
			Containers:                   []corev1.Container{{Name: "gateway", Image: "gateway:test"}},
		},
	}
	for _, s := range secrets {
		p.Spec.ImagePullSecrets = append(p.Spec.ImagePullSecrets, corev1.LocalObjectReference{Name: s})
	}
	created, err := f.env.Client.CoreV1().Pods(ns).Create(context.Background(), p, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return harness.Pod{Name: name, Namespace: ns, UID: string(created.UID), ServiceAccount: sa}
}

func (f *fixture) publish(t *testing.T, pod harness.Pod) (*csipb.NodePublishVolumeRequest, error) {
	t.Helper()
	req, err := f.kubelet.PublishRequest(pod, "filter", map[string]string{"image": f.image})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	_, err = f.daemon.Node.NodePublishVolume(ctx, req)
	if err == nil {
		t.Cleanup(func() {
			f.daemon.Node.NodeUnpublishVolume(context.Background(), &csipb.NodeUnpublishVolumeRequest{VolumeId: req.VolumeId, TargetPath: req.TargetPath})
		})
	}
	return req, err
}

func (f *fixture) mustServe(t *testing.T, req *csipb.NodePublishVolumeRequest) {
	t.Helper()
	got, err := os.ReadFile(filepath.Join(req.TargetPath, "plugin.wasm"))
	if err != nil || string(got) != string(f.module) {
		t.Fatalf("mounted module differs (%d bytes, %v)", len(got), err)
	}
}

// podEvents lists the events of pod (this very pod: its UID).
func (f *fixture) podEvents(t *testing.T, pod harness.Pod) []corev1.Event {
	t.Helper()
	list, err := f.env.Client.CoreV1().Events(pod.Namespace).List(context.Background(), metav1.ListOptions{
		FieldSelector: "involvedObject.name=" + pod.Name,
	})
	if err != nil {
		t.Fatal(err)
	}
	var out []corev1.Event
	for _, e := range list.Items {
		if string(e.InvolvedObject.UID) == pod.UID {
			out = append(out, e)
		}
	}
	return out
}

// events waits until the pod has events whose reasons include all of want,
// and returns their messages by reason.
func (f *fixture) events(t *testing.T, pod harness.Pod, want ...string) map[string][]string {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		got := map[string][]string{}
		for _, e := range f.podEvents(t, pod) {
			got[e.Reason] = append(got[e.Reason], e.Message)
		}
		missing := false
		for _, r := range want {
			if len(got[r]) == 0 {
				missing = true
			}
		}
		if !missing {
			return got
		}
		if time.Now().After(deadline) {
			t.Fatalf("events of pod %s/%s: got %v, want reasons %v", pod.Namespace, pod.Name, got, want)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

func TestKubernetes(t *testing.T) {
	harness.RequireRoot(t)
	ctx := context.Background()
	env := kubeenv.StartT(t, kubeenv.Options{})
	for _, f := range []string{"namespace.yaml", "serviceaccount.yaml", "clusterrole.yaml", "clusterrolebinding.yaml", "csidriver.yaml"} {
		if _, err := env.ApplyFile(ctx, repoPath(t, "manifests/base/"+f)); err != nil {
			t.Fatalf("applying %s: %v", f, err)
		}
	}
	bin, err := harness.BuildDriver(t.TempDir(), true)
	if err != nil {
		t.Fatal(err)
	}
	const ns = "team-a"
	if err := env.CreateNamespace(ctx, ns); err != nil {
		t.Fatal(err)
	}

	t.Run("pull secrets, confused deputy, events", func(t *testing.T) {
		f := setup(t, bin, env, driverSA)
		host := f.reg.ProxyHost()
		f.secret(t, ns, "regcred", corev1.SecretTypeDockerConfigJson, map[string][]byte{corev1.DockerConfigJsonKey: dockerConfigJSON(host, user, password)})
		f.secret(t, ns, "badcred", corev1.SecretTypeDockerConfigJson, map[string][]byte{corev1.DockerConfigJsonKey: dockerConfigJSON(host, user, "wrong-"+password)})
		legacy, _ := json.Marshal(map[string]any{host: map[string]string{"auth": base64.StdEncoding.EncodeToString([]byte(user + ":" + password))}})
		f.secret(t, ns, "legacycred", corev1.SecretTypeDockercfg, map[string][]byte{corev1.DockerConfigKey: legacy})
		if _, err := env.Client.CoreV1().ServiceAccounts(ns).Create(ctx, &corev1.ServiceAccount{
			ObjectMeta:       metav1.ObjectMeta{Name: "builder", Namespace: ns},
			ImagePullSecrets: []corev1.LocalObjectReference{{Name: "regcred"}},
		}, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}

		// A pod with no credentials, before anything is cached: the registry
		// refuses, the message says what was tried and no password leaks.
		nobody := f.pod(t, ns, "gw-nobody", "default")
		_, err := f.publish(t, nobody)
		if c := status.Code(err); c != codes.PermissionDenied {
			t.Fatalf("no credentials: %v, want PermissionDenied", err)
		}
		if f.reg.TotalBlobGets() != 0 {
			t.Fatalf("refused pull downloaded %d blobs", f.reg.TotalBlobGets())
		}
		ev := f.events(t, nobody, "Failed")
		if !strings.Contains(ev["Failed"][0], f.image) {
			t.Errorf("Failed event does not name the image: %q", ev["Failed"][0])
		}

		// A wrong secret, then the right one: tried in order, first refused.
		bad := f.pod(t, ns, "gw-bad", "default", "badcred")
		_, err = f.publish(t, bad)
		if status.Code(err) != codes.PermissionDenied || !strings.Contains(err.Error(), "secret team-a/badcred") || strings.Contains(err.Error(), password) {
			t.Fatalf("wrong secret: %v", err)
		}

		owner := f.pod(t, ns, "gw-owner", "default", "badcred", "regcred")
		req, err := f.publish(t, owner)
		if err != nil {
			t.Fatalf("pod with regcred: %v", err)
		}
		f.mustServe(t, req)
		ev = f.events(t, owner, "Pulling", "Pulled")
		if pulled := ev["Pulled"][0]; !strings.Contains(pulled, "sha256:") || !strings.Contains(pulled, f.image) {
			t.Errorf("Pulled event lacks the image or digest: %q", pulled)
		}
		gets := f.reg.TotalBlobGets()

		// The module is now on the node. A pod without credentials must not
		// get it: the registry is asked, and refuses.
		thief := f.pod(t, ns, "gw-thief", "default")
		_, err = f.publish(t, thief)
		if status.Code(err) != codes.PermissionDenied || !strings.Contains(err.Error(), "another pod") {
			t.Fatalf("cached private module served without credentials: %v", err)
		}
		f.events(t, thief, "Failed")

		// Through the service account's imagePullSecrets, and a legacy
		// dockercfg secret: served from the node, no new download.
		viaSA := f.pod(t, ns, "gw-sa", "builder")
		req, err = f.publish(t, viaSA)
		if err != nil {
			t.Fatalf("pod whose service account has regcred: %v", err)
		}
		f.mustServe(t, req)
		ev = f.events(t, viaSA, "Pulled")
		if !strings.Contains(ev["Pulled"][0], "already present") {
			t.Errorf("cached publish event: %q", ev["Pulled"][0])
		}
		legacyPod := f.pod(t, ns, "gw-legacy", "default", "legacycred")
		req, err = f.publish(t, legacyPod)
		if err != nil {
			t.Fatalf("pod with a dockercfg secret: %v", err)
		}
		f.mustServe(t, req)
		if f.reg.TotalBlobGets() != gets {
			t.Errorf("cached module downloaded again: %d blob GETs, want %d", f.reg.TotalBlobGets(), gets)
		}
		if strings.Contains(f.daemon.Logs(), password) {
			t.Errorf("the daemon logged a password")
		}
	})

	t.Run("a long pull shows its progress in events and inspect", func(t *testing.T) {
		testPullProgress(t, bin, env, ns)
	})

	t.Run("events API refused does not fail publishes", func(t *testing.T) {
		// A driver identity whose role lacks the events rule: publishes
		// still succeed (events are best effort), proving they never wait on it.
		role := &rbacv1.ClusterRole{
			ObjectMeta: metav1.ObjectMeta{Name: "wasm-csi-no-events"},
			Rules: []rbacv1.PolicyRule{
				{APIGroups: []string{""}, Resources: []string{"pods", "secrets", "serviceaccounts"}, Verbs: []string{"get"}},
			},
		}
		if _, err := env.Client.RbacV1().ClusterRoles().Create(ctx, role, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
		if _, err := env.Client.CoreV1().ServiceAccounts(driverNS).Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: "no-events", Namespace: driverNS}}, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
		if _, err := env.Client.RbacV1().ClusterRoleBindings().Create(ctx, &rbacv1.ClusterRoleBinding{
			ObjectMeta: metav1.ObjectMeta{Name: "wasm-csi-no-events"},
			RoleRef:    rbacv1.RoleRef{APIGroup: "rbac.authorization.k8s.io", Kind: "ClusterRole", Name: role.Name},
			Subjects:   []rbacv1.Subject{{Kind: "ServiceAccount", Namespace: driverNS, Name: "no-events"}},
		}, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
		f := setup(t, bin, env, "no-events")
		f.secret(t, ns, "regcred2", corev1.SecretTypeDockerConfigJson, map[string][]byte{corev1.DockerConfigJsonKey: dockerConfigJSON(f.reg.ProxyHost(), user, password)})
		for i := 0; i < 3; i++ {
			p := f.pod(t, ns, fmt.Sprintf("gw-quiet-%d", i), "default", "regcred2")
			req, err := f.publish(t, p)
			if err != nil {
				t.Fatalf("publish %d with the events API refused: %v", i, err)
			}
			f.mustServe(t, req)
		}
	})

	t.Run("the manifests' role is what the driver needs", func(t *testing.T) {
		// The driver's identity can do exactly its rules: get secrets, but
		// not list them; create events; nothing cluster-wide beyond that.
		cfg, err := env.RESTConfigForServiceAccount(ctx, driverNS, driverSA)
		if err != nil {
			t.Fatal(err)
		}
		client, err := kubernetes.NewForConfig(cfg)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := client.CoreV1().Secrets(ns).List(ctx, metav1.ListOptions{}); err == nil {
			t.Errorf("the driver can list secrets")
		}
		if _, err := client.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{}); err == nil {
			t.Errorf("the driver can list pods")
		}
		if _, err := env.Client.CoreV1().Secrets(ns).Create(ctx, &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Name: "probe", Namespace: ns}}, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
		if err := client.CoreV1().Secrets(ns).Delete(ctx, "probe", metav1.DeleteOptions{}); err == nil {
			t.Errorf("the driver can delete secrets")
		}
		if _, err := client.CoreV1().Secrets(ns).Get(ctx, "probe", metav1.GetOptions{}); err != nil {
			t.Errorf("the driver cannot get a secret: %v", err)
		}
	})
}
