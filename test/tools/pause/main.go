// Command pause is the pod sandbox ("pause") image of the end-to-end
// cluster: it does nothing until SIGTERM or SIGINT, then exits 0. It is a
// static Go program because these machines cannot pull registry.k8s.io/pause.
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	<-sig
}
