// Command pki writes the certificates and kubeconfigs of the end-to-end
// cluster (test/e2e/cluster.sh): a self-made CA, the apiserver's serving
// certificate, its client certificate for kubelets, kubelet's serving
// certificate, the service account key pair, and kubeconfigs with client
// certificates for the admin (system:masters), the kubelet
// (system:node:NODE in system:nodes), kube-controller-manager and
// kube-scheduler. It follows test/lib/kubeenv's certificate code (ECDSA P-256,
// PKCS#8 keys), whose helpers are unexported.
//
//	pki -dir DIR -node NODE -server https://127.0.0.1:PORT -service-ip 10.96.23.1
package main

import (
	"crypto/x509"
	"encoding/base64"
	"encoding/pem"
	"flag"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"time"

	"github.com/wasm-csi/wasm-csi/test/lib/kubeenv"
)

const validity = 72 * time.Hour

func main() {
	dir := flag.String("dir", "", "output directory")
	node := flag.String("node", "", "node name")
	server := flag.String("server", "", "apiserver URL for the kubeconfigs")
	serviceIP := flag.String("service-ip", "", "ClusterIP of the kubernetes Service (in the apiserver certificate)")
	flag.Parse()
	if *dir == "" || *node == "" || *server == "" || *serviceIP == "" {
		fmt.Fprintln(os.Stderr, "usage: pki -dir DIR -node NODE -server URL -service-ip IP")
		os.Exit(2)
	}
	if err := run(*dir, *node, *server, net.ParseIP(*serviceIP)); err != nil {
		fmt.Fprintln(os.Stderr, "pki:", err)
		os.Exit(1)
	}
}

func run(dir, node, server string, serviceIP net.IP) error {
	if serviceIP == nil {
		return fmt.Errorf("-service-ip is not an IP address")
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	c, err := kubeenv.NewCA()
	if err != nil {
		return err
	}
	files := map[string][]byte{"ca.crt": c.CertPEM, "ca.key": c.KeyPEM}
	leaf := func(name, cn string, orgs, dns []string, ips []net.IP, usage x509.ExtKeyUsage) error {
		crt, key, err := c.Issue(cn, orgs, dns, ips, usage)
		if err != nil {
			return err
		}
		files[name+".crt"], files[name+".key"] = crt, key
		return nil
	}
	loopback := []net.IP{net.IPv4(127, 0, 0, 1), net.IPv6loopback}
	if err := leaf("apiserver", "kube-apiserver", nil,
		[]string{"localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc", "kubernetes.default.svc.cluster.local"},
		append(loopback, serviceIP), x509.ExtKeyUsageServerAuth); err != nil {
		return err
	}
	if err := leaf("apiserver-kubelet-client", "kube-apiserver-kubelet-client", []string{"system:masters"}, nil, nil, x509.ExtKeyUsageClientAuth); err != nil {
		return err
	}
	if err := leaf("kubelet", node, nil, []string{node, "localhost"}, loopback, x509.ExtKeyUsageServerAuth); err != nil {
		return err
	}
	for _, u := range []struct{ file, cn, org string }{
		{"admin", "wasm-csi-e2e:admin", "system:masters"},
		{"kubelet-client", "system:node:" + node, "system:nodes"},
		{"controller-manager", "system:kube-controller-manager", ""},
		{"scheduler", "system:kube-scheduler", ""},
	} {
		var orgs []string
		if u.org != "" {
			orgs = []string{u.org}
		}
		if err := leaf(u.file, u.cn, orgs, nil, nil, x509.ExtKeyUsageClientAuth); err != nil {
			return err
		}
	}
	saKey, err := kubeenv.NewKey()
	if err != nil {
		return err
	}
	if files["sa.key"], err = kubeenv.KeyPEM(saKey); err != nil {
		return err
	}
	pubDER, err := x509.MarshalPKIXPublicKey(saKey.Public())
	if err != nil {
		return err
	}
	files["sa.pub"] = pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: pubDER})

	for _, k := range []struct{ file, user, cert string }{
		{"admin.kubeconfig", "wasm-csi-e2e:admin", "admin"},
		{"kubelet.kubeconfig", "system:node:" + node, "kubelet-client"},
		{"controller-manager.kubeconfig", "system:kube-controller-manager", "controller-manager"},
		{"scheduler.kubeconfig", "system:kube-scheduler", "scheduler"},
	} {
		files[k.file] = kubeconfig(server, k.user, c.CertPEM, files[k.cert+".crt"], files[k.cert+".key"])
	}
	for name, data := range files {
		mode := os.FileMode(0o600)
		if filepath.Ext(name) == ".crt" || name == "sa.pub" {
			mode = 0o644
		}
		if err := os.WriteFile(filepath.Join(dir, name), data, mode); err != nil {
			return err
		}
	}
	return nil
}

func kubeconfig(server, user string, caPEM, certPEM, keyPEM []byte) []byte {
	b64 := base64.StdEncoding.EncodeToString
	return []byte(fmt.Sprintf(`apiVersion: v1
kind: Config
clusters:
- name: wasm-csi-e2e
  cluster:
    server: %s
    certificate-authority-data: %s
users:
- name: %q
  user:
    client-certificate-data: %s
    client-key-data: %s
contexts:
- name: wasm-csi-e2e
  context:
    cluster: wasm-csi-e2e
    user: %q
    namespace: default
current-context: wasm-csi-e2e
`, server, b64(caPEM), user, b64(certPEM), b64(keyPEM), user))
}
