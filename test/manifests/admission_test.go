package manifests

import (
	"context"
	"fmt"
	"path/filepath"
	"strings"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	batchv1 "k8s.io/api/batch/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/wasm-csi/wasm-csi/puller"
	"github.com/wasm-csi/wasm-csi/puller/imagematch"
	"github.com/wasm-csi/wasm-csi/test/lib/kubeenv"
)

const (
	allowedImagesOverlay = "manifests/overlays/allowed-images"
	allowedImagesPolicy  = "wasm-csi-allowed-images"
)

// podWith is a pod in ns whose volumes w0, w1, ... are wasm-csi volumes of
// images ("" leaves the image attribute out).
func podWith(name, ns string, images ...string) *corev1.Pod {
	p := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns},
		Spec: corev1.PodSpec{Containers: []corev1.Container{{
			Name: "gateway", Image: "envoyproxy/envoy:v1.35.0",
		}}},
	}
	for i, img := range images {
		attrs := map[string]string{"pullPolicy": "IfNotPresent"}
		if img != "" {
			attrs["image"] = img
		}
		ro := true
		p.Spec.Volumes = append(p.Spec.Volumes, corev1.Volume{
			Name: fmt.Sprintf("w%d", i),
			VolumeSource: corev1.VolumeSource{CSI: &corev1.CSIVolumeSource{
				Driver: csiDriverName, ReadOnly: &ro, VolumeAttributes: attrs,
			}},
		})
	}
	return p
}

// csiDriverName is the driver name the policy checks.
const csiDriverName = "wasm.csi.dev"

// admission creates obj for real (no dry run) and returns the apiserver's error.
type admission struct {
	t   *testing.T
	env *kubeenv.Env
	n   int
}

func (a *admission) name(prefix string) string {
	a.n++
	return fmt.Sprintf("%s-%d", prefix, a.n)
}

func (a *admission) createPod(ns string, images ...string) error {
	p := podWith(a.name("pod"), ns, images...)
	_, err := a.env.Client.CoreV1().Pods(ns).Create(context.Background(), p, metav1.CreateOptions{})
	return err
}

// wantRefused checks err is the policy's refusal carrying every word.
func wantRefused(t *testing.T, what string, err error, words ...string) {
	t.Helper()
	if err == nil {
		t.Errorf("%s: admitted, want refused", what)
		return
	}
	if !apierrors.IsForbidden(err) && !apierrors.IsInvalid(err) {
		t.Errorf("%s: %v, want the policy's refusal", what, err)
		return
	}
	msg := err.Error()
	if !strings.Contains(msg, allowedImagesPolicy) {
		t.Errorf("%s: refused, but not by the wasm-csi policy: %v", what, err)
	}
	for _, w := range words {
		if !strings.Contains(msg, w) {
			t.Errorf("%s: message %q does not say %q", what, msg, w)
		}
	}
}

// eventually polls cond (which returns why it is not yet true) for up to a
// minute: the apiserver picks policies, bindings and parameters up from its
// informers, a moment after they are written.
func eventually(t *testing.T, what string, cond func() error) {
	t.Helper()
	deadline := time.Now().Add(time.Minute)
	for {
		err := cond()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: still not true after a minute: %v", what, err)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// setList sets the policy's list of patterns (its first variable), as an
// overlay's patch does.
func (a *admission) setList(patterns ...string) {
	a.t.Helper()
	ctx := context.Background()
	policies := a.env.Client.AdmissionregistrationV1().ValidatingAdmissionPolicies()
	p, err := policies.Get(ctx, allowedImagesPolicy, metav1.GetOptions{})
	if err != nil {
		a.t.Fatal(err)
	}
	if p.Spec.Variables[0].Name != "patterns" {
		a.t.Fatalf("the policy's first variable is %q, not patterns", p.Spec.Variables[0].Name)
	}
	quoted := make([]string, len(patterns))
	for i, pat := range patterns {
		quoted[i] = "'" + pat + "'"
	}
	p.Spec.Variables[0].Expression = "[" + strings.Join(quoted, ", ") + "]"
	if _, err := policies.Update(ctx, p, metav1.UpdateOptions{}); err != nil {
		a.t.Fatal(err)
	}
}

// TestAllowedImagesPolicy applies manifests/overlays/allowed-images to a
// real kube-apiserver and checks what its ValidatingAdmissionPolicy admits:
// the same images as the driver's own matcher (puller/imagematch) for the
// same list, only in namespaces labelled wasm.csi.dev/allowed=true, and
// nothing without a wasm-csi volume is affected.
func TestAllowedImagesPolicy(t *testing.T) {
	env := kubeenv.StartT(t, kubeenv.Options{})
	ctx := context.Background()
	if _, err := env.ApplyKustomize(ctx, filepath.Join(repoRoot(t), allowedImagesOverlay)); err != nil {
		t.Fatal(err)
	}
	a := &admission{t: t, env: env}
	const allowedNS, plainNS = "gateways", "apps"
	for _, ns := range []string{allowedNS, plainNS} {
		if err := env.CreateNamespace(ctx, ns); err != nil {
			t.Fatal(err)
		}
	}
	nsObj, err := env.Client.CoreV1().Namespaces().Get(ctx, allowedNS, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	nsObj.Labels = map[string]string{"wasm.csi.dev/allowed": "true"}
	if _, err := env.Client.CoreV1().Namespaces().Update(ctx, nsObj, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}

	patterns := []string{"ghcr.io/acme", "registry.local:5000", "*.dkr.ecr.*.amazonaws.com", "docker.io/library/nginx", "[::1]:5000/team/"}
	a.setList(patterns...)
	list, err := imagematch.ParseList(patterns)
	if err != nil {
		t.Fatal(err)
	}
	// Wait until the policy and the list are in force.
	eventually(t, "the policy refuses ghcr.io/acmecorp", func() error {
		if err := a.createPod(allowedNS, "ghcr.io/acmecorp/x:1"); err == nil || !strings.Contains(err.Error(), "ghcr.io/acme,") {
			return fmt.Errorf("pod admitted or refused otherwise: %v", err)
		}
		return nil
	})

	digest := "@sha256:" + strings.Repeat("a", 64)
	for _, img := range []string{
		"ghcr.io/acme/filters/header:1.2.0",
		"ghcr.io/acme" + digest,
		"ghcr.io/acme/x:1" + digest,
		"oci://ghcr.io/acme/x:1",
		"GHCR.io/acme/x:1",
		"ghcr.io/acmecorp/x:1",
		"ghcr.io/acme-x:1",
		"ghcr.io:443/acme/x:1",
		"evil.io/ghcr.io/acme:1",
		"ghcr.io.evil.io/acme:1",
		"registry.local:5000/a/b:1",
		"registry.local:5001/a/b:1",
		"registry.local/a/b:1",
		"123456789012.dkr.ecr.eu-west-1.amazonaws.com/acme/m:1",
		"dkr.ecr.eu-west-1.amazonaws.com/acme/m:1",
		"a.b.dkr.ecr.eu-west-1.amazonaws.com/acme/m:1",
		"nginx",
		"nginx:1.27",
		"docker.io/nginx",
		"index.docker.io/library/nginx:1",
		"library/nginx",
		"nginx-evil",
		"someone/nginx",
		"[::1]:5000/team/m:1",
		"[::1]:5000/other/m:1",
		"localhost:5000/team/m:1",
	} {
		ref, err := puller.ParseReference(img)
		if err != nil {
			t.Fatalf("%s: %v", img, err)
		}
		_, driverAllows := list.Match(ref.Registry, ref.Repository)
		err = a.createPod(allowedNS, img)
		switch {
		case driverAllows && err != nil:
			t.Errorf("%s: refused at admission, but the driver's registries.allowed would serve it: %v", img, err)
		case !driverAllows:
			wantRefused(t, img, err, "names image "+img, "ghcr.io/acme, registry.local:5000", "ask a cluster admin")
		}
	}

	// Several volumes: the message names only the refused one.
	err = a.createPod(allowedNS, "ghcr.io/acme/ok:1", "quay.io/evil/x:1")
	wantRefused(t, "two volumes", err, "volume w1 names image quay.io/evil/x:1")
	if err != nil && strings.Contains(err.Error(), "w0") {
		t.Errorf("the message names the allowed volume w0: %v", err)
	}
	wantRefused(t, "no image attribute", a.createPod(allowedNS, ""), "volume w0")
	long := "ghcr.io/evil/" + strings.Repeat("a", 100<<10) + ":1"
	err = a.createPod(allowedNS, long)
	wantRefused(t, "100 KB image", err, "ghcr.io/evil/aaa")
	if err != nil && len(err.Error()) > 2000 {
		t.Errorf("a 100 KB image gave a %d-byte message", len(err.Error()))
	}

	// A namespace without the label: refused even for an allowed image;
	// pods without a wasm-csi volume (or with another driver's) are not
	// affected.
	wantRefused(t, "unlabelled namespace", a.createPod(plainNS, "ghcr.io/acme/x:1"),
		"namespace "+plainNS, "wasm.csi.dev/allowed=true", "kubectl label namespace "+plainNS)
	if err := a.createPod(plainNS); err != nil {
		t.Errorf("a pod without a wasm-csi volume: %v", err)
	}
	other := podWith(a.name("other-driver"), plainNS, "quay.io/evil/x:1")
	other.Spec.Volumes[0].CSI.Driver = "secrets-store.csi.k8s.io"
	if _, err := env.Client.CoreV1().Pods(plainNS).Create(ctx, other, metav1.CreateOptions{}); err != nil {
		t.Errorf("a pod with another driver's CSI volume: %v", err)
	}

	// Workloads are checked at apply time too, not only when their pods are made.
	template := func(images ...string) corev1.PodTemplateSpec {
		p := podWith("", "", images...)
		return corev1.PodTemplateSpec{ObjectMeta: metav1.ObjectMeta{Labels: map[string]string{"app": "gw"}}, Spec: p.Spec}
	}
	deploy := func(name string, images ...string) error {
		d := &appsv1.Deployment{
			ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: allowedNS},
			Spec: appsv1.DeploymentSpec{
				Selector: &metav1.LabelSelector{MatchLabels: map[string]string{"app": "gw"}},
				Template: template(images...),
			},
		}
		_, err := env.Client.AppsV1().Deployments(allowedNS).Create(ctx, d, metav1.CreateOptions{})
		return err
	}
	if err := deploy("good", "ghcr.io/acme/x:1"); err != nil {
		t.Errorf("deployment of an allowed image: %v", err)
	}
	wantRefused(t, "deployment", deploy("bad", "quay.io/evil/x:1"), "quay.io/evil/x:1")
	good, err := env.Client.AppsV1().Deployments(allowedNS).Get(ctx, "good", metav1.GetOptions{})
	if err == nil {
		good.Spec.Template = template("quay.io/evil/x:2")
		_, err = env.Client.AppsV1().Deployments(allowedNS).Update(ctx, good, metav1.UpdateOptions{})
		wantRefused(t, "deployment update", err, "quay.io/evil/x:2")
	}
	cj := &batchv1.CronJob{
		ObjectMeta: metav1.ObjectMeta{Name: "cron", Namespace: allowedNS},
		Spec: batchv1.CronJobSpec{Schedule: "0 * * * *", JobTemplate: batchv1.JobTemplateSpec{Spec: batchv1.JobSpec{
			Template: func() corev1.PodTemplateSpec {
				pt := template("quay.io/evil/x:3")
				pt.Spec.RestartPolicy = corev1.RestartPolicyNever
				return pt
			}(),
		}}},
	}
	_, err = env.Client.BatchV1().CronJobs(allowedNS).Create(ctx, cj, metav1.CreateOptions{})
	wantRefused(t, "cronjob", err, "quay.io/evil/x:3")

	// A list with a pattern that is not HOST[:PORT][/PATH] refuses
	// everything and says which line is wrong.
	a.setList("ghcr.io/acme", "ghcr.io/acme/*")
	eventually(t, "a bad pattern refuses", func() error {
		err := a.createPod(allowedNS, "ghcr.io/acme/x:1")
		if err == nil || !strings.Contains(err.Error(), "invalid patterns: ghcr.io/acme/*") {
			return fmt.Errorf("got %v", err)
		}
		return nil
	})
	// An empty list allows nothing.
	a.setList()
	eventually(t, "an empty list refuses", func() error {
		err := a.createPod(allowedNS, "ghcr.io/acme/x:1")
		if err == nil || !strings.Contains(err.Error(), "wasm-csi-allowed-images: none") {
			return fmt.Errorf("got %v", err)
		}
		return nil
	})
	if err := a.createPod(plainNS); err != nil {
		t.Errorf("with an empty list, a pod without a wasm-csi volume: %v", err)
	}
}
