// Package credprovider runs kubelet's credential provider plugins for the
// driver: the `--image-credential-provider-config` file (kubelet's
// CredentialProviderConfig, a file or a directory of them) and the
// executables in `--image-credential-provider-bin-dir`, spoken to over
// kubelet's exec API (CredentialProviderRequest on stdin,
// CredentialProviderResponse on stdout), with kubelet's matchImages globs,
// cache keys and cache durations.
//
// It owns the plugin processes (their arguments, environment, timeout and
// output caps) and the cache of their answers. It gives credentials to the
// puller (puller.CredentialProvider) and must not touch the registry, the
// store or the Kubernetes API: whether a credential works is the puller's
// business, and what plugins print on stdout (the credentials) is never
// logged nor put into an error.
package credprovider

import (
	"errors"
	"fmt"
	"io"
	"net"
	"net/url"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"sort"
	"strings"

	"k8s.io/apimachinery/pkg/runtime/schema"
	kubeletconfigv1 "k8s.io/kubelet/config/v1"
	"sigs.k8s.io/yaml"
)

// maxConfigFileSize caps one config file: it is the operator's, but a file
// that big is a mistake, not a configuration.
const maxConfigFileSize = 1 << 20

// configKind is the kind of kubelet's credential provider config file.
const configKind = "CredentialProviderConfig"

// configVersions are the apiVersions of the config file kubelet reads. The
// three have the same fields (v1 adds tokenAttributes), so all are decoded
// into the published v1 type.
var configVersions = map[string]bool{
	kubeletconfigv1.SchemeGroupVersion.String(): true,
	"kubelet.config.k8s.io/v1beta1":             true,
	"kubelet.config.k8s.io/v1alpha1":            true,
}

// readConfig reads a config file, or every *.json, *.yaml and *.yml file of
// a directory in lexical order (as kubelet does), into one list of
// providers. Unknown fields are errors.
func readConfig(p string) ([]kubeletconfigv1.CredentialProvider, error) {
	if p == "" {
		return nil, errors.New("no credential provider config file given")
	}
	fi, err := os.Stat(p)
	if err != nil {
		return nil, err
	}
	files := []string{p}
	if fi.IsDir() {
		entries, err := os.ReadDir(p)
		if err != nil {
			return nil, err
		}
		files = files[:0]
		for _, e := range entries {
			switch filepath.Ext(e.Name()) {
			case ".json", ".yaml", ".yml":
				if !e.IsDir() {
					files = append(files, filepath.Join(p, e.Name()))
				}
			}
		}
		sort.Strings(files)
		if len(files) == 0 {
			return nil, fmt.Errorf("directory %s has no *.json, *.yaml or *.yml file", p)
		}
	}
	var out []kubeletconfigv1.CredentialProvider
	for _, f := range files {
		cfg, err := readConfigFile(f)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", f, err)
		}
		out = append(out, cfg.Providers...)
	}
	return out, nil
}

func readConfigFile(file string) (*kubeletconfigv1.CredentialProviderConfig, error) {
	f, err := os.Open(file)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	data, err := io.ReadAll(io.LimitReader(f, maxConfigFileSize+1))
	if err != nil {
		return nil, err
	}
	if len(data) > maxConfigFileSize {
		return nil, fmt.Errorf("larger than %d bytes", maxConfigFileSize)
	}
	var tm struct {
		APIVersion string `json:"apiVersion"`
		Kind       string `json:"kind"`
	}
	if err := yaml.Unmarshal(data, &tm); err != nil {
		return nil, fmt.Errorf("not YAML or JSON: %w", err)
	}
	if tm.Kind != configKind || !configVersions[tm.APIVersion] {
		return nil, fmt.Errorf("apiVersion %q, kind %q: want kind %s of apiVersion %s (or v1beta1, v1alpha1)",
			tm.APIVersion, tm.Kind, configKind, kubeletconfigv1.SchemeGroupVersion)
	}
	cfg := &kubeletconfigv1.CredentialProviderConfig{}
	if err := yaml.UnmarshalStrict(data, cfg); err != nil {
		return nil, err
	}
	return cfg, nil
}

// validate checks the providers as kubelet does, and refuses what the
// driver does not support (tokenAttributes), so that a config kubelet would
// refuse, or one the driver would half-apply, stops the driver at start.
func validate(providers []kubeletconfigv1.CredentialProvider) error {
	var errs []error
	if len(providers) == 0 {
		errs = append(errs, errors.New("providers: at least one provider is required"))
	}
	seen := map[string]bool{}
	for i, p := range providers {
		at := fmt.Sprintf("providers[%d] (%q)", i, p.Name)
		bad := func(format string, args ...any) {
			errs = append(errs, fmt.Errorf(at+": "+format, args...))
		}
		switch {
		case p.Name == "":
			bad("name is required")
		case p.Name == "." || p.Name == ".." || strings.ContainsAny(p.Name, "/ "):
			bad("name must be a file name in the plugin directory (no '/', no spaces, not '.' or '..')")
		case seen[p.Name]:
			bad("name appears twice")
		}
		seen[p.Name] = true
		if !pluginVersions[p.APIVersion] {
			bad("apiVersion %q is not one of %s", p.APIVersion, strings.Join(supportedPluginVersions(), ", "))
		}
		if len(p.MatchImages) == 0 {
			bad("matchImages needs at least one pattern")
		}
		for _, m := range p.MatchImages {
			if err := checkPattern(m); err != nil {
				bad("matchImages %q: %v", m, err)
			}
		}
		switch {
		case p.DefaultCacheDuration == nil:
			bad("defaultCacheDuration is required")
		case p.DefaultCacheDuration.Duration < 0:
			bad("defaultCacheDuration must not be negative")
		}
		for _, e := range p.Env {
			if e.Name == "" || strings.ContainsAny(e.Name, "=\x00") {
				bad("env name %q is not a variable name", e.Name)
			}
		}
		if p.TokenAttributes != nil {
			bad("tokenAttributes (service-account-token mode, KEP-4412) is not supported by wasm-csi: " +
				"remove this provider from the driver's config, and give pods an imagePullSecret or the node credentials instead")
		}
	}
	return errors.Join(errs...)
}

// pluginVersions are the exec API versions kubelet speaks to plugins.
var pluginVersions = map[string]bool{
	"credentialprovider.kubelet.k8s.io/v1":       true,
	"credentialprovider.kubelet.k8s.io/v1beta1":  true,
	"credentialprovider.kubelet.k8s.io/v1alpha1": true,
}

func supportedPluginVersions() []string {
	var out []string
	for v := range pluginVersions {
		out = append(out, v)
	}
	sort.Strings(out)
	return out
}

// findBinary returns the plugin's executable in dir, as kubelet finds it
// when it starts: a missing or non-executable file is an error then, not at
// the first pull.
func findBinary(dir, name string) (string, error) {
	if dir == "" {
		return "", errors.New("no --image-credential-provider-bin-dir given")
	}
	bin := filepath.Join(dir, name)
	if _, err := exec.LookPath(bin); err != nil {
		return "", fmt.Errorf("plugin %q: no executable %s: %w", name, bin, errors.Unwrap(err))
	}
	return bin, nil
}

// parseSchemeless parses "host[:port][/path]" as kubelet parses both a
// matchImages pattern and an image.
func parseSchemeless(s string) (*url.URL, error) {
	u, err := url.Parse("https://" + s)
	if err != nil {
		return nil, err
	}
	u.Scheme = ""
	return u, nil
}

func checkPattern(m string) error {
	u, err := parseSchemeless(m)
	if err != nil {
		return errors.Unwrap(err)
	}
	if u.Host == "" {
		return errors.New("no host")
	}
	host, _ := splitHost(u)
	for _, label := range host {
		if _, err := path.Match(label, ""); err != nil {
			return err
		}
	}
	return nil
}

// splitHost returns the host's DNS labels and the port.
func splitHost(u *url.URL) ([]string, string) {
	host, port, err := net.SplitHostPort(u.Host)
	if err != nil {
		host, port = u.Host, ""
	}
	return strings.Split(host, "."), port
}

// matchImage reports whether image ("host[:port]/repository") matches the
// pattern as kubelet's matchImages do: the same number of host labels, each
// matched by a glob ('*' within one label: "*.dkr.ecr.*.amazonaws.com",
// "*-docker.pkg.dev"), the same port (none matches none), and the pattern's
// path a prefix of the image's (a string prefix, as in kubelet).
func matchImage(pattern, image string) bool {
	pu, err := parseSchemeless(pattern)
	if err != nil {
		return false
	}
	iu, err := parseSchemeless(image)
	if err != nil {
		return false
	}
	pl, pport := splitHost(pu)
	il, iport := splitHost(iu)
	if pport != iport || len(pl) != len(il) || !strings.HasPrefix(iu.Path, pu.Path) {
		return false
	}
	for i := range pl {
		if ok, _ := path.Match(pl[i], il[i]); !ok {
			return false
		}
	}
	return true
}

// groupVersion parses an apiVersion the validation accepted.
func groupVersion(apiVersion string) schema.GroupVersion {
	gv, _ := schema.ParseGroupVersion(apiVersion)
	return gv
}
