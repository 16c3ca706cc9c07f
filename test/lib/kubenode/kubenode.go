// Package kubenode is a support library for the programs that run on a
// Kubernetes node and look at it from outside the driver: the end-to-end
// suite (test/e2e) and the cluster benchmark (test/clusterbench). It
// provides what a pod's status says (PodReady, PodState) and what the
// node's mount table says (MountOf, MountPoints).
//
// The mount table is read with github.com/moby/sys/mountinfo, the parser
// k8s.io/mount-utils itself uses to find mount points; it unescapes paths
// ("\040" for a space), which mount-utils' ParseMountInfo and
// ListProcMounts do not. It needs /proc only: no root, no cluster.
package kubenode

import (
	"fmt"
	"slices"
	"strings"

	"github.com/moby/sys/mountinfo"
	corev1 "k8s.io/api/core/v1"
)

// PodReady reports whether p is Running with its Ready condition true.
func PodReady(p *corev1.Pod) bool {
	if p.Status.Phase != corev1.PodRunning {
		return false
	}
	for _, c := range p.Status.Conditions {
		if c.Type == corev1.PodReady {
			return c.Status == corev1.ConditionTrue
		}
	}
	return false
}

// PodState is p's phase and, for each container (init containers first),
// its state: waiting (reason: message), terminated (reason, exit code) or
// running (ready, restarts). It is for messages and for telling pods apart
// by state, not for parsing.
func PodState(p *corev1.Pod) string {
	s := string(p.Status.Phase)
	statuses := append(slices.Clone(p.Status.InitContainerStatuses), p.Status.ContainerStatuses...)
	for _, cs := range statuses {
		switch {
		case cs.State.Waiting != nil:
			s += fmt.Sprintf(" %s:waiting(%s: %s)", cs.Name, cs.State.Waiting.Reason, cs.State.Waiting.Message)
		case cs.State.Terminated != nil:
			s += fmt.Sprintf(" %s:terminated(%s, exit %d)", cs.Name, cs.State.Terminated.Reason, cs.State.Terminated.ExitCode)
		case cs.State.Running != nil:
			s += fmt.Sprintf(" %s:running(ready=%v, restarts=%d)", cs.Name, cs.Ready, cs.RestartCount)
		}
	}
	return s
}

// Mount is one mount of the node's mount table.
type Mount struct {
	mountinfo.Info
}

// Opts are the mount's options as /proc/mounts shows them: its per-mount
// options (ro or rw, nosuid, nodev, ...) and its file system's (superblock)
// options. A mount is read-only when either says "ro" (an overlay without
// an upper dir is read-only in its superblock), so Opts holds "ro" then.
func (m Mount) Opts() []string {
	opts := strings.Split(m.Options, ",")
	if m.VFSOptions != "" {
		opts = append(opts, strings.Split(m.VFSOptions, ",")...)
	}
	return opts
}

// String is the mount as a person reads it: "SOURCE on PATH type FSTYPE (OPTS)".
func (m Mount) String() string {
	return fmt.Sprintf("%s on %s type %s (%s)", m.Source, m.Mountpoint, m.FSType, strings.Join(m.Opts(), ","))
}

// MountOf returns the mount on path that is on top (the last one mounted
// there), if path is a mount point.
func MountOf(path string) (Mount, bool, error) {
	ms, err := mountinfo.GetMounts(func(i *mountinfo.Info) (skip, stop bool) {
		return i.Mountpoint != path, false
	})
	if err != nil || len(ms) == 0 {
		return Mount{}, false, err
	}
	return Mount{*ms[len(ms)-1]}, true, nil
}

// MountPoints returns every mount point of the machine.
func MountPoints() (map[string]bool, error) {
	ms, err := mountinfo.GetMounts(nil)
	if err != nil {
		return nil, err
	}
	out := make(map[string]bool, len(ms))
	for _, m := range ms {
		out[m.Mountpoint] = true
	}
	return out, nil
}
