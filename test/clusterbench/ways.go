package main

import (
	"fmt"
	"strings"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// Names shared with test/e2e/cluster.sh and test/e2e/overlay.
const (
	driverName      = "wasm.csi.dev"
	driverNamespace = "wasm-csi"
	driverDaemonSet = "wasm-csi-node"
	gatewayImage    = "e2e.wasm-csi.local/gateway:e2e"
	moduleDir       = "/etc/wasm"
	moduleFile      = "plugin.wasm"
	volumeName      = "filter"
)

const (
	modeCold = "cold"
	modeWarm = "warm"
)

type wayKind int

const (
	kindBaseline wayKind = iota
	kindInit
	kindImageVolume
	kindCSI
)

// way is one way of giving the gateway its module.
type way struct {
	key   string // flag and CSV name
	label string // table and chart name
	kind  wayKind
	// cncf: the module as a CNCF Wasm artifact; else the Docker-format image.
	cncf bool
}

var allWays = []way{
	{key: "baseline", label: "(a) baseline, no module", kind: kindBaseline},
	{key: "init", label: "(b) init container + emptyDir", kind: kindInit},
	{key: "imagevol-docker", label: "(c) image volume, Docker image", kind: kindImageVolume},
	{key: "imagevol-cncf", label: "(c') image volume, CNCF artifact", kind: kindImageVolume, cncf: true},
	{key: "csi-docker", label: "(d) wasm-csi, Docker image", kind: kindCSI},
	{key: "csi-cncf", label: "(d) wasm-csi, CNCF artifact", kind: kindCSI, cncf: true},
}

func wayKeys() []string {
	var out []string
	for _, w := range allWays {
		out = append(out, w.key)
	}
	return out
}

func parseWays(s string) ([]way, error) {
	var out []way
	for _, f := range strings.Split(s, ",") {
		f = strings.TrimSpace(f)
		found := false
		for _, w := range allWays {
			if w.key == f {
				out = append(out, w)
				found = true
			}
		}
		if !found {
			return nil, fmt.Errorf("unknown way %q (want some of %s)", f, strings.Join(wayKeys(), ", "))
		}
	}
	return out, nil
}

// usesRuntimePull: the runtime pulls the module's image (cold runs empty it).
func (w way) usesRuntimePull() bool { return w.kind == kindInit || w.kind == kindImageVolume }

// usesDriver: the driver pulls the module (cold runs empty its store).
func (w way) usesDriver() bool { return w.kind == kindCSI }

// images are the references of one module size, as pods name them (through
// the registry's counting proxy).
type images struct {
	docker string // Docker-format image: FROM scratch, COPY plugin.wasm /
	cncf   string // CNCF Wasm artifact
	init   string // Docker-format image: the copier and plugin.wasm
	sha256 string // hex of the module's bytes
	size   int64
}

// pod is the pod of way w for this module, as people write it: the same
// gateway container every time, the module at /etc/wasm/plugin.wasm.
func (w way) pod(ns, name string, img images, labels map[string]string) *corev1.Pod {
	grace := int64(1)
	automount := false
	gw := corev1.Container{
		Name:            "gateway",
		Image:           gatewayImage,
		ImagePullPolicy: corev1.PullNever,
		Ports:           []corev1.ContainerPort{{Name: "http", ContainerPort: 8080}},
		Resources: corev1.ResourceRequirements{
			Requests: corev1.ResourceList{corev1.ResourceCPU: resource.MustParse("10m"), corev1.ResourceMemory: resource.MustParse("16Mi")},
			Limits:   corev1.ResourceList{corev1.ResourceMemory: resource.MustParse("256Mi")},
		},
	}
	spec := corev1.PodSpec{
		DNSPolicy:                     corev1.DNSDefault, // the cluster runs no DNS
		TerminationGracePeriodSeconds: &grace,
		AutomountServiceAccountToken:  &automount,
		EnableServiceLinks:            new(bool),
	}
	mount := corev1.VolumeMount{Name: volumeName, MountPath: moduleDir, ReadOnly: true}
	switch w.kind {
	case kindBaseline:
		gw.Args = []string{"-module="}
	case kindInit:
		spec.InitContainers = []corev1.Container{{
			Name:            "copy-module",
			Image:           img.init,
			ImagePullPolicy: corev1.PullIfNotPresent,
			Command:         []string{"/cp", "/" + moduleFile, "/wasm/" + moduleFile},
			VolumeMounts:    []corev1.VolumeMount{{Name: volumeName, MountPath: "/wasm"}},
			Resources:       gw.Resources,
		}}
		spec.Volumes = []corev1.Volume{{Name: volumeName, VolumeSource: corev1.VolumeSource{EmptyDir: &corev1.EmptyDirVolumeSource{}}}}
		gw.VolumeMounts = []corev1.VolumeMount{mount}
	case kindImageVolume:
		ref := img.docker
		if w.cncf {
			ref = img.cncf
		}
		spec.Volumes = []corev1.Volume{{Name: volumeName, VolumeSource: corev1.VolumeSource{
			Image: &corev1.ImageVolumeSource{Reference: ref, PullPolicy: corev1.PullIfNotPresent},
		}}}
		gw.VolumeMounts = []corev1.VolumeMount{mount}
	case kindCSI:
		ref := img.docker
		if w.cncf {
			ref = img.cncf
		}
		readOnly := true
		spec.Volumes = []corev1.Volume{{Name: volumeName, VolumeSource: corev1.VolumeSource{
			CSI: &corev1.CSIVolumeSource{Driver: driverName, ReadOnly: &readOnly, VolumeAttributes: map[string]string{"image": ref}},
		}}}
		gw.VolumeMounts = []corev1.VolumeMount{mount}
	}
	spec.Containers = []corev1.Container{gw}
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns, Labels: labels},
		Spec:       spec,
	}
}
