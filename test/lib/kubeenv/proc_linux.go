package kubeenv

import "syscall"

// sysProcAttr puts a child in its own process group (Close signals the
// group) and has the kernel kill it if the test process dies first, so a
// crashed or timed-out test leaves no etcd or apiserver behind.
func sysProcAttr() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
}
