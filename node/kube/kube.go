// Package kube is the driver's access to the Kubernetes API: a pod's pull
// secrets (its imagePullSecrets, then its service account's), read with
// `get` only, and image events on pods, sent in the background.
//
// It owns: the core/v1 REST client and the event broadcaster.
//
// It must not: log or write a secret, list or watch anything, or block a
// publish (events are queued and dropped if the API is slow).
package kube

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"time"

	units "github.com/docker/go-units"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/serializer"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/client-go/tools/record"

	"github.com/wasm-csi/wasm-csi/node"
	"github.com/wasm-csi/wasm-csi/node/store"
	"github.com/wasm-csi/wasm-csi/puller"
)

// ClientConfig returns the API client config: --kubeconfig if given, else
// in-cluster. ok is false when there is neither (no Kubernetes API).
func ClientConfig(kubeconfig string) (cfg *rest.Config, ok bool, err error) {
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

// CoreClient makes the few core/v1 calls the driver needs: get a pod, a
// service account, a secret, and write events. It is a REST client over a
// scheme holding core/v1 only, not client-go's clientset, on purpose: the
// clientset registers every API group's types when the program starts,
// which took the idle daemon from 17 to 45 MiB of resident memory.
type CoreClient struct {
	rc     *rest.RESTClient
	scheme *runtime.Scheme
}

// NewCoreClient returns a core/v1 client for cfg.
func NewCoreClient(cfg *rest.Config) (*CoreClient, error) {
	scheme := runtime.NewScheme()
	if err := corev1.AddToScheme(scheme); err != nil {
		return nil, err
	}
	c := rest.CopyConfig(cfg)
	c.GroupVersion = &corev1.SchemeGroupVersion
	c.APIPath = "/api"
	c.ContentType = runtime.ContentTypeJSON
	c.NegotiatedSerializer = serializer.NewCodecFactory(scheme).WithoutConversion()
	if c.UserAgent == "" {
		c.UserAgent = rest.DefaultKubernetesUserAgent()
	}
	rc, err := rest.RESTClientFor(c)
	if err != nil {
		return nil, err
	}
	return &CoreClient{rc: rc, scheme: scheme}, nil
}

func (c *CoreClient) get(ctx context.Context, resource, ns, name string, into runtime.Object) error {
	return c.rc.Get().Namespace(ns).Resource(resource).Name(name).Do(ctx).Into(into)
}

// eventSink writes events for client-go's event broadcaster.
type eventSink struct{ c *CoreClient }

const eventTimeout = 10 * time.Second

func (s eventSink) Create(e *corev1.Event) (*corev1.Event, error) {
	ctx, cancel := context.WithTimeout(context.Background(), eventTimeout)
	defer cancel()
	out := &corev1.Event{}
	return out, s.c.rc.Post().Namespace(e.Namespace).Resource("events").Body(e).Do(ctx).Into(out)
}

func (s eventSink) Update(e *corev1.Event) (*corev1.Event, error) {
	ctx, cancel := context.WithTimeout(context.Background(), eventTimeout)
	defer cancel()
	out := &corev1.Event{}
	return out, s.c.rc.Put().Namespace(e.Namespace).Resource("events").Name(e.Name).Body(e).Do(ctx).Into(out)
}

func (s eventSink) Patch(e *corev1.Event, data []byte) (*corev1.Event, error) {
	ctx, cancel := context.WithTimeout(context.Background(), eventTimeout)
	defer cancel()
	out := &corev1.Event{}
	return out, s.c.rc.Patch(types.StrategicMergePatchType).Namespace(e.Namespace).Resource("events").Name(e.Name).Body(data).Do(ctx).Into(out)
}

// Credentials reads a pod's pull secrets from the API: the pod's
// imagePullSecrets, then its service account's, each with a `get` (no
// list, no watch). Secrets are parsed in memory and never written or logged.
type Credentials struct {
	Client *CoreClient
	Log    *slog.Logger
}

// Keyrings returns the pod's keyrings in the order kubelet tries them.
// Secrets that are missing or of another type are skipped with a warning.
func (k *Credentials) Keyrings(ctx context.Context, pod node.PodInfo) ([]*puller.Keyring, error) {
	p := &corev1.Pod{}
	if err := k.Client.get(ctx, "pods", pod.Namespace, pod.Name, p); err != nil {
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
		acct := &corev1.ServiceAccount{}
		err := k.Client.get(ctx, "serviceaccounts", pod.Namespace, sa, acct)
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

func (k *Credentials) secretKeyring(ctx context.Context, ns, name string) (*puller.Keyring, error) {
	s := &corev1.Secret{}
	if err := k.Client.get(ctx, "secrets", ns, name, s); err != nil {
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

// Events records image events on pods, as kubelet does for container
// images. Events go through client-go's broadcaster: queued and sent in
// the background, dropped if the API is slow, never blocking a publish.
type Events struct {
	recorder    record.EventRecorder
	broadcaster record.EventBroadcaster
}

// NewEvents starts an event broadcaster reporting as component.
func NewEvents(client *CoreClient, component, nodeName string) *Events {
	b := record.NewBroadcaster()
	b.StartRecordingToSink(eventSink{client})
	return &Events{
		broadcaster: b,
		recorder:    b.NewRecorder(client.scheme, corev1.EventSource{Component: component, Host: nodeName}),
	}
}

// Shutdown flushes and stops the broadcaster.
func (e *Events) Shutdown() { e.broadcaster.Shutdown() }

func podRef(pod node.PodInfo) *corev1.ObjectReference {
	return &corev1.ObjectReference{Kind: "Pod", APIVersion: "v1", Namespace: pod.Namespace, Name: pod.Name, UID: types.UID(pod.UID)}
}

func (e *Events) ok(pod node.PodInfo) bool { return e != nil && pod.Namespace != "" && pod.Name != "" }

// Pulling: a download starts for this pod.
func (e *Events) Pulling(pod node.PodInfo, image string) {
	if e.ok(pod) {
		e.recorder.Eventf(podRef(pod), corev1.EventTypeNormal, "Pulling", "Pulling Wasm module %q", image)
	}
}

// WaitingForPullSlot: the download waits for one of the slots
// limits.maxConcurrentPulls allows; the reason is kubelet's Pulling.
func (e *Events) WaitingForPullSlot(pod node.PodInfo, image string, inFlight, slots int) {
	if e.ok(pod) {
		e.recorder.Eventf(podRef(pod), corev1.EventTypeNormal, "Pulling",
			"Waiting for a pull slot to pull Wasm module %q: %d of %d pulls in flight (limits.maxConcurrentPulls)", image, inFlight, slots)
	}
}

// PullProgress: a long download's bytes so far, of its total (the
// daemon's --pull-progress-* flags pace them). The reason is kubelet's
// Pulling: these follow the Pulling event of the same pull.
func (e *Events) PullProgress(pod node.PodInfo, image string, done, total int64) {
	if e.ok(pod) {
		pct := int64(0)
		if total > 0 {
			pct = done * 100 / total
		}
		e.recorder.Eventf(podRef(pod), corev1.EventTypeNormal, "Pulling", "Pulling Wasm module %q: %s of %s (%d%%)",
			image, units.BytesSize(float64(done)), units.BytesSize(float64(total)), pct)
	}
}

// Pulled: the module was downloaded, verified and stored.
func (e *Events) Pulled(pod node.PodInfo, image string, rec store.RefRecord, took time.Duration) {
	if e.ok(pod) {
		e.recorder.Eventf(podRef(pod), corev1.EventTypeNormal, "Pulled",
			"Successfully pulled Wasm module %q in %s. Module digest: %s, size: %d bytes, manifest: %s",
			image, took.Round(time.Millisecond), rec.Module, rec.Size, rec.Manifest)
	}
}

// AlreadyPresent: the module was on the node.
func (e *Events) AlreadyPresent(pod node.PodInfo, image string, rec store.RefRecord) {
	if e.ok(pod) {
		e.recorder.Eventf(podRef(pod), corev1.EventTypeNormal, "Pulled",
			"Wasm module %q already present on node. Module digest: %s, size: %d bytes", image, rec.Module, rec.Size)
	}
}

// Failed: the publish could not get the module; the message says why.
func (e *Events) Failed(pod node.PodInfo, image string, err error) {
	if e.ok(pod) {
		e.recorder.Eventf(podRef(pod), corev1.EventTypeWarning, "Failed", "Failed to pull Wasm module %q: %v", image, err)
	}
}

// Verified: a signature the image's policy trusts covers the module.
func (e *Events) Verified(pod node.PodInfo, image, policy, signer string) {
	if e.ok(pod) {
		e.recorder.Eventf(podRef(pod), corev1.EventTypeNormal, "Verified", "Wasm module %q verified by policy %s: signed by %s", image, policy, signer)
	}
}

// VerificationFailed: warn mode served a module its policy does not verify.
func (e *Events) VerificationFailed(pod node.PodInfo, image, policy string, err error) {
	if e.ok(pod) {
		e.recorder.Eventf(podRef(pod), corev1.EventTypeWarning, "VerificationFailed",
			"Wasm module %q served although policy %s (mode warn) does not verify it: %v", image, policy, err)
	}
}
