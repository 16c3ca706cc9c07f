package node

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/kubernetes/scheme"
	typedcorev1 "k8s.io/client-go/kubernetes/typed/core/v1"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/client-go/tools/record"

	"github.com/wasm-csi/wasm-csi/puller"
)

// KubeConfig returns the API client config: --kubeconfig if given, else
// in-cluster. ok is false when there is neither (no Kubernetes API).
func KubeConfig(kubeconfig string) (cfg *rest.Config, ok bool, err error) {
	if kubeconfig != "" {
		cfg, err = clientcmd.BuildConfigFromFlags("", kubeconfig)
		return cfg, err == nil, err
	}
	cfg, err = rest.InClusterConfig()
	if errors.Is(err, rest.ErrNotInCluster) {
		return nil, false, nil
	}
	return cfg, err == nil, err
}

// KubeCredentials reads a pod's pull secrets from the API: the pod's
// imagePullSecrets, then its service account's, each with a `get` (no
// list, no watch). Secrets are parsed in memory and never written or logged.
type KubeCredentials struct {
	Client kubernetes.Interface
	Log    *slog.Logger
}

// Keyrings returns the pod's keyrings in the order kubelet tries them.
// Secrets that are missing or of another type are skipped with a warning.
func (k *KubeCredentials) Keyrings(ctx context.Context, pod PodInfo) ([]*puller.Keyring, error) {
	p, err := k.Client.CoreV1().Pods(pod.Namespace).Get(ctx, pod.Name, metav1.GetOptions{})
	if err != nil {
		return nil, fmt.Errorf("reading pod %s/%s: %w", pod.Namespace, pod.Name, err)
	}
	if pod.UID != "" && string(p.UID) != pod.UID {
		return nil, fmt.Errorf("pod %s/%s has uid %s, not the volume's %s", pod.Namespace, pod.Name, p.UID, pod.UID)
	}
	names := make([]string, 0, len(p.Spec.ImagePullSecrets))
	for _, r := range p.Spec.ImagePullSecrets {
		names = append(names, r.Name)
	}
	sa := p.Spec.ServiceAccountName
	if sa == "" {
		sa = pod.ServiceAccount
	}
	if sa != "" {
		acct, err := k.Client.CoreV1().ServiceAccounts(pod.Namespace).Get(ctx, sa, metav1.GetOptions{})
		switch {
		case err == nil:
			for _, r := range acct.ImagePullSecrets {
				names = append(names, r.Name)
			}
		case apierrors.IsNotFound(err):
		default:
			k.Log.Warn("service account not read", "pod", pod.Namespace+"/"+pod.Name, "serviceAccount", sa, "err", err)
		}
	}
	var out []*puller.Keyring
	seen := map[string]bool{}
	for _, name := range names {
		if seen[name] {
			continue
		}
		seen[name] = true
		kr, err := k.secretKeyring(ctx, pod.Namespace, name)
		if err != nil {
			k.Log.Warn("pull secret skipped", "pod", pod.Namespace+"/"+pod.Name, "secret", name, "err", err)
			continue
		}
		out = append(out, kr)
	}
	return out, nil
}

func (k *KubeCredentials) secretKeyring(ctx context.Context, ns, name string) (*puller.Keyring, error) {
	s, err := k.Client.CoreV1().Secrets(ns).Get(ctx, name, metav1.GetOptions{})
	if err != nil {
		return nil, err
	}
	label := "secret " + ns + "/" + name
	switch s.Type {
	case corev1.SecretTypeDockerConfigJson:
		return puller.ParseDockerConfigJSON(label, s.Data[corev1.DockerConfigJsonKey])
	case corev1.SecretTypeDockercfg:
		return puller.ParseDockerCfg(label, s.Data[corev1.DockerConfigKey])
	}
	return nil, fmt.Errorf("type %s is not %s or %s", s.Type, corev1.SecretTypeDockerConfigJson, corev1.SecretTypeDockercfg)
}

// KubeEvents records image events on pods, as kubelet does for container
// images. Events go through client-go's broadcaster: queued and sent in
// the background, dropped if the API is slow, never blocking a publish.
type KubeEvents struct {
	recorder    record.EventRecorder
	broadcaster record.EventBroadcaster
}

// NewKubeEvents starts an event broadcaster reporting as component.
func NewKubeEvents(client kubernetes.Interface, component, nodeName string) *KubeEvents {
	b := record.NewBroadcaster()
	b.StartRecordingToSink(&typedcorev1.EventSinkImpl{Interface: client.CoreV1().Events("")})
	return &KubeEvents{
		broadcaster: b,
		recorder:    b.NewRecorder(scheme.Scheme, corev1.EventSource{Component: component, Host: nodeName}),
	}
}

// Shutdown flushes and stops the broadcaster.
func (e *KubeEvents) Shutdown() { e.broadcaster.Shutdown() }

func podRef(pod PodInfo) *corev1.ObjectReference {
	return &corev1.ObjectReference{Kind: "Pod", APIVersion: "v1", Namespace: pod.Namespace, Name: pod.Name, UID: types.UID(pod.UID)}
}

func (e *KubeEvents) ok(pod PodInfo) bool { return e != nil && pod.Namespace != "" && pod.Name != "" }

// Pulling: a download starts for this pod.
func (e *KubeEvents) Pulling(pod PodInfo, image string) {
	if e.ok(pod) {
		e.recorder.Eventf(podRef(pod), corev1.EventTypeNormal, "Pulling", "Pulling Wasm module %q", image)
	}
}

// Pulled: the module was downloaded, verified and stored.
func (e *KubeEvents) Pulled(pod PodInfo, image string, rec RefRecord, took time.Duration) {
	if e.ok(pod) {
		e.recorder.Eventf(podRef(pod), corev1.EventTypeNormal, "Pulled",
			"Successfully pulled Wasm module %q in %s. Module digest: %s, size: %d bytes, manifest: %s",
			image, took.Round(time.Millisecond), rec.Module, rec.Size, rec.Manifest)
	}
}

// AlreadyPresent: the module was on the node.
func (e *KubeEvents) AlreadyPresent(pod PodInfo, image string, rec RefRecord) {
	if e.ok(pod) {
		e.recorder.Eventf(podRef(pod), corev1.EventTypeNormal, "Pulled",
			"Wasm module %q already present on node. Module digest: %s, size: %d bytes", image, rec.Module, rec.Size)
	}
}

// Failed: the publish could not get the module; the message says why.
func (e *KubeEvents) Failed(pod PodInfo, image string, err error) {
	if e.ok(pod) {
		e.recorder.Eventf(podRef(pod), corev1.EventTypeWarning, "Failed", "Failed to pull Wasm module %q: %v", image, err)
	}
}
