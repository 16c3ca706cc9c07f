package main

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/kubernetes"

	"github.com/wasm-csi/wasm-csi/test/lib/kubenode"
)

// observed is what the watch saw of one pod.
type observed struct {
	created time.Time // the create call returned
	ready   time.Time // first seen Ready=True
	failed  string    // why it cannot start, once that is certain
	state   string    // its last state, for timeouts
}

// tracker follows the pods of a run through one watch and records when each
// became Ready, or why it will not.
type tracker struct {
	mu   sync.Mutex
	pods map[string]*observed
	// changed is signalled (without blocking) on every event.
	changed chan struct{}
}

func newTracker() *tracker {
	return &tracker{pods: map[string]*observed{}, changed: make(chan struct{}, 1)}
}

func (t *tracker) created(name string, at time.Time) {
	t.mu.Lock()
	defer t.mu.Unlock()
	o := t.get(name)
	o.created = at
}

func (t *tracker) get(name string) *observed {
	o := t.pods[name]
	if o == nil {
		o = &observed{}
		t.pods[name] = o
	}
	return o
}

// fatalWaiting are the waiting reasons after which a pod does not start
// without a change to it or to the node.
var fatalWaiting = map[string]bool{
	"ErrImagePull": true, "ImagePullBackOff": true, "ErrImageNeverPull": true, "InvalidImageName": true,
	"CrashLoopBackOff": true, "CreateContainerError": true, "CreateContainerConfigError": true, "RunContainerError": true,
}

// see records one state of a pod.
func (t *tracker) see(p *corev1.Pod, at time.Time) {
	t.mu.Lock()
	defer t.mu.Unlock()
	o := t.get(p.Name)
	o.state = kubenode.PodState(p)
	if o.ready.IsZero() && kubenode.PodReady(p) {
		o.ready = at
	}
	if o.failed == "" {
		o.failed = podFailure(p)
	}
	select {
	case t.changed <- struct{}{}:
	default:
	}
}

// podFailure says why p will not start, or "".
func podFailure(p *corev1.Pod) string {
	if p.Status.Phase == corev1.PodFailed {
		return "pod failed: " + p.Status.Reason + " " + p.Status.Message
	}
	statuses := append(append([]corev1.ContainerStatus{}, p.Status.InitContainerStatuses...), p.Status.ContainerStatuses...)
	for _, cs := range statuses {
		if cs.RestartCount > 0 {
			why := "restarted"
			if lt := cs.LastTerminationState.Terminated; lt != nil {
				why = fmt.Sprintf("exited %d (%s)", lt.ExitCode, lt.Reason)
			}
			return fmt.Sprintf("%s: crash-loop: %s", cs.Name, why)
		}
		if w := cs.State.Waiting; w != nil && fatalWaiting[w.Reason] {
			return fmt.Sprintf("%s: %s: %s", cs.Name, w.Reason, w.Message)
		}
		if term := cs.State.Terminated; term != nil && term.ExitCode != 0 {
			return fmt.Sprintf("%s: exited %d (%s)", cs.Name, term.ExitCode, term.Reason)
		}
	}
	return ""
}

// watchPods feeds t with the pods of namespace ns until ctx ends, watching
// again from the last resource version when the apiserver closes a watch.
func watchPods(ctx context.Context, cs kubernetes.Interface, ns string, t *tracker, started chan<- error) {
	list, err := cs.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{})
	if err != nil {
		started <- err
		return
	}
	rv := list.ResourceVersion
	first := true
	for ctx.Err() == nil {
		w, err := cs.CoreV1().Pods(ns).Watch(ctx, metav1.ListOptions{ResourceVersion: rv, AllowWatchBookmarks: true})
		if first {
			started <- err
			first = false
			if err != nil {
				return
			}
		}
		if err != nil {
			time.Sleep(200 * time.Millisecond)
			continue
		}
		for ev := range w.ResultChan() {
			now := time.Now()
			p, ok := ev.Object.(*corev1.Pod)
			if !ok {
				continue
			}
			rv = p.ResourceVersion
			if ev.Type == watch.Added || ev.Type == watch.Modified {
				t.see(p, now)
			}
		}
		w.Stop()
	}
}

// gatewayLog is what a gateway's log says about its start.
type gatewayLog struct {
	sha256  string
	bytes   int64
	started time.Time // the runtime's timestamp of the "started" line
	errLine string
}

var (
	loadedRE  = regexp.MustCompile(`wasm-gateway: loaded (\S+) sha256=([0-9a-f]{64}) bytes=(\d+)`)
	startedRE = regexp.MustCompile(`wasm-gateway: started `)
	errorRE   = regexp.MustCompile(`wasm-gateway: error: (.*)`)
)

// parseGatewayLog reads `kubectl logs --timestamps` output of the gateway.
func parseGatewayLog(r io.Reader) gatewayLog {
	var g gatewayLog
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		ts, line, ok := strings.Cut(sc.Text(), " ")
		if !ok {
			continue
		}
		if m := loadedRE.FindStringSubmatch(line); m != nil {
			g.sha256 = m[2]
			g.bytes, _ = strconv.ParseInt(m[3], 10, 64)
		}
		if startedRE.MatchString(line) && g.started.IsZero() {
			g.started, _ = time.Parse(time.RFC3339Nano, ts)
		}
		if m := errorRE.FindStringSubmatch(line); m != nil && g.errLine == "" {
			g.errLine = m[1]
		}
	}
	return g
}

// gatewayLogOf reads the gateway container's log of pod name (the previous
// instance's when the current one has not logged a start).
func gatewayLogOf(ctx context.Context, cs kubernetes.Interface, ns, name string) gatewayLog {
	var g gatewayLog
	for _, previous := range []bool{false, true} {
		rc, err := cs.CoreV1().Pods(ns).GetLogs(name, &corev1.PodLogOptions{Container: "gateway", Timestamps: true, Previous: previous}).Stream(ctx)
		if err != nil {
			continue
		}
		got := parseGatewayLog(io.LimitReader(rc, 1<<20))
		rc.Close()
		if !got.started.IsZero() || got.errLine != "" {
			return got
		}
		if g.sha256 == "" {
			g = got
		}
	}
	return g
}

// lastWarning returns the newest warning event about pod name (a refused
// volume says why there).
func lastWarning(ctx context.Context, cs kubernetes.Interface, ns, name string) string {
	evs, err := cs.CoreV1().Events(ns).List(ctx, metav1.ListOptions{FieldSelector: "involvedObject.name=" + name})
	if err != nil {
		return ""
	}
	sort.Slice(evs.Items, func(i, j int) bool { return evs.Items[i].LastTimestamp.Before(&evs.Items[j].LastTimestamp) })
	for i := len(evs.Items) - 1; i >= 0; i-- {
		if e := evs.Items[i]; e.Type == corev1.EventTypeWarning {
			return e.Reason + ": " + e.Message
		}
	}
	return ""
}

// deletePods deletes every pod of ns and waits until the API no longer has
// them: kubelet has stopped their containers and unmounted their volumes.
func deletePods(ctx context.Context, cs kubernetes.Interface, ns string, timeout time.Duration) error {
	grace := int64(1)
	if err := cs.CoreV1().Pods(ns).DeleteCollection(ctx, metav1.DeleteOptions{GracePeriodSeconds: &grace}, metav1.ListOptions{}); err != nil {
		return err
	}
	return poll(ctx, timeout, "the pods of "+ns+" deleted", func() (bool, string, error) {
		l, err := cs.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{})
		if err != nil {
			return false, "", err
		}
		return len(l.Items) == 0, fmt.Sprintf("%d pods left", len(l.Items)), nil
	})
}

// poll calls f every 200ms until it is done, fails, or timeout passes.
func poll(ctx context.Context, timeout time.Duration, what string, f func() (bool, string, error)) error {
	deadline := time.Now().Add(timeout)
	last := ""
	for {
		done, why, err := f()
		if err != nil && !apierrors.IsNotFound(err) {
			last = err.Error()
		} else if done {
			return nil
		} else {
			last = why
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s: not after %v: %s", what, timeout, last)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// driver is the driver's DaemonSet on the node.
type driver struct {
	cs       kubernetes.Interface
	node     string
	selector string
}

// pod returns the driver's live pod on the node, or nil.
func (d driver) pod(ctx context.Context) (*corev1.Pod, error) {
	l, err := d.cs.CoreV1().Pods(driverNamespace).List(ctx, metav1.ListOptions{LabelSelector: d.selector})
	if err != nil {
		return nil, err
	}
	for i := range l.Items {
		if l.Items[i].DeletionTimestamp == nil && l.Items[i].Spec.NodeName == d.node {
			return &l.Items[i], nil
		}
	}
	return nil, nil
}

// offLabel is a node label no node has: the DaemonSet selecting it has no pod.
const offLabel = "clusterbench.wasm-csi.dev/driver-off"

// stop takes the driver off the node (a node selector no node matches) and
// waits until its pod is gone. Nothing is mounted from it then, if no pod
// of the benchmark is left.
func (d driver) stop(ctx context.Context) error {
	patch, _ := json.Marshal(map[string]any{"spec": map[string]any{"template": map[string]any{"spec": map[string]any{
		"nodeSelector": map[string]string{offLabel: "true"}}}}})
	if _, err := d.cs.AppsV1().DaemonSets(driverNamespace).Patch(ctx, driverDaemonSet, types.StrategicMergePatchType, patch, metav1.PatchOptions{}); err != nil {
		return fmt.Errorf("taking the driver off the node: %w", err)
	}
	return poll(ctx, 2*time.Minute, "the driver's pod gone", func() (bool, string, error) {
		l, err := d.cs.CoreV1().Pods(driverNamespace).List(ctx, metav1.ListOptions{LabelSelector: d.selector})
		if err != nil {
			return false, "", err
		}
		return len(l.Items) == 0, fmt.Sprintf("%d driver pods", len(l.Items)), nil
	})
}

// start puts the driver back and waits until its pod is Ready and kubelet
// lists it on the node's CSINode. It returns the pod.
func (d driver) start(ctx context.Context) (*corev1.Pod, error) {
	patch := []byte(`{"spec":{"template":{"spec":{"nodeSelector":{"` + offLabel + `":null}}}}}`)
	if _, err := d.cs.AppsV1().DaemonSets(driverNamespace).Patch(ctx, driverDaemonSet, types.StrategicMergePatchType, patch, metav1.PatchOptions{}); err != nil {
		return nil, fmt.Errorf("putting the driver back: %w", err)
	}
	return d.waitReady(ctx)
}

func (d driver) waitReady(ctx context.Context) (*corev1.Pod, error) {
	var pod *corev1.Pod
	err := poll(ctx, 3*time.Minute, "the driver Ready and registered", func() (bool, string, error) {
		p, err := d.pod(ctx)
		if err != nil || p == nil {
			return false, "no driver pod", err
		}
		if !kubenode.PodReady(p) {
			return false, kubenode.PodState(p), nil
		}
		n, err := d.cs.StorageV1().CSINodes().Get(ctx, d.node, metav1.GetOptions{})
		if err != nil {
			return false, "", err
		}
		for _, dr := range n.Spec.Drivers {
			if dr.Name == driverName {
				pod = p
				return true, "", nil
			}
		}
		return false, "not on the CSINode yet", nil
	})
	return pod, err
}
