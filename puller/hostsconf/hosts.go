package hostsconf

import (
	"crypto/x509"
	"errors"
	"fmt"
	"io/fs"
	"net/http"
	"net/url"
	"os"
	"path"
	"path/filepath"
	"sort"
	"strings"

	"github.com/pelletier/go-toml/v2"
	"github.com/pelletier/go-toml/v2/unstable"
)

// Caps on what is read from the host: these files are the operator's, but a
// runaway file must not take the daemon's memory.
const (
	maxConfigFileSize = 1 << 20
	maxCAFileSize     = 1 << 20
	maxHostDirs       = 1024
	maxHostsPerFile   = 64
)

// hostsFile is one <dir>/<name>/hosts.toml as containerd reads it: the
// [host."…"] entries in file order, then the server.
type hostsFile struct {
	path  string
	hosts []Endpoint // mirrors first, in file order; the server last (Mirror false)
	// server is set when the file names a server; without one the
	// registry itself is the last endpoint.
	server bool
}

// hostFileEntry is the keys of a host table (and of the file's top level,
// which describes the server), as containerd's hosts.toml defines them.
type hostFileEntry struct {
	Capabilities []string       `toml:"capabilities"`
	CA           any            `toml:"ca"`
	SkipVerify   *bool          `toml:"skip_verify"`
	Header       map[string]any `toml:"header"`
	OverridePath bool           `toml:"override_path"`
}

// hostDirNames are the directories containerd looks in for host, in order:
// "host_port_" (the form that avoids ':' in file names), "host:port", then
// "_default".
func hostDirNames(host string) []string {
	var out []string
	if i := strings.LastIndex(host, ":"); i > 0 && !strings.HasSuffix(host, "]") {
		out = append(out, host[:i]+"_"+host[i+1:]+"_")
	}
	return append(out, host, "_default")
}

// loadHostsDir reads every <dir>/*/hosts.toml. A file that does not parse is
// reported in errs and replaced by its entry in last, if any: the last good
// version of that file stays in force. A missing dir is an empty config.
func loadHostsDir(dir string, last map[string]*hostsFile) (map[string]*hostsFile, []error) {
	out := map[string]*hostsFile{}
	entries, err := os.ReadDir(dir)
	if errors.Is(err, fs.ErrNotExist) {
		return out, nil
	}
	if err != nil {
		// Nothing could be read: everything known stays.
		return last, []error{fmt.Errorf("reading %s: %w", dir, err)}
	}
	var errs []error
	if len(entries) > maxHostDirs {
		errs = append(errs, fmt.Errorf("%s has %d entries; only the first %d are read", dir, len(entries), maxHostDirs))
		entries = entries[:maxHostDirs]
	}
	for _, e := range entries {
		name := e.Name()
		hostDir := filepath.Join(dir, name)
		if st, err := os.Stat(hostDir); err != nil || !st.IsDir() {
			continue
		}
		file := filepath.Join(hostDir, "hosts.toml")
		data, err := readCapped(file, maxConfigFileSize)
		if errors.Is(err, fs.ErrNotExist) {
			// A directory of certificates only (Docker's certs.d layout):
			// nothing to mirror.
			continue
		}
		if err == nil {
			var hf *hostsFile
			if hf, err = parseHostsFile(file, hostDir, data); err == nil {
				out[name] = hf
				continue
			}
		}
		errs = append(errs, err)
		if prev, ok := last[name]; ok {
			out[name] = prev
		}
	}
	return out, errs
}

// parseHostsFile parses one hosts.toml. Relative ca paths are relative to
// the file's directory, as in containerd; CA files are read now, so a file
// naming a CA that cannot be read does not parse.
func parseHostsFile(file, baseDir string, data []byte) (*hostsFile, error) {
	order, err := hostOrder(data)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", file, describeTOMLError(err))
	}
	var c struct {
		hostFileEntry
		Server string                   `toml:"server"`
		Hosts  map[string]hostFileEntry `toml:"host"`
	}
	if err := toml.Unmarshal(data, &c); err != nil {
		return nil, fmt.Errorf("%s: %w", file, describeTOMLError(err))
	}
	if len(order) > maxHostsPerFile {
		return nil, fmt.Errorf("%s: %d hosts; at most %d are read", file, len(order), maxHostsPerFile)
	}
	hf := &hostsFile{path: file}
	for _, h := range order {
		ep, err := hostEndpoint(h, baseDir, c.Hosts[h])
		if err != nil {
			return nil, fmt.Errorf("%s: host %q: %w", file, h, err)
		}
		ep.Mirror = true
		ep.Origin = file
		hf.hosts = append(hf.hosts, ep)
	}
	if c.Server != "" {
		ep, err := hostEndpoint(c.Server, baseDir, c.hostFileEntry)
		if err != nil {
			return nil, fmt.Errorf("%s: server %q: %w", file, c.Server, err)
		}
		ep.Origin = file
		hf.hosts = append(hf.hosts, ep)
		hf.server = true
	} else {
		// The top level's settings (ca, skip_verify, header, capabilities)
		// still describe the registry itself.
		ep, err := hostEndpoint("", baseDir, c.hostFileEntry)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", file, err)
		}
		ep.Origin = file
		hf.hosts = append(hf.hosts, ep)
	}
	return hf, nil
}

// hostOrder lists the [host."…"] tables in the order the file has them
// (a TOML map loses it; containerd keeps it the same way).
func hostOrder(data []byte) ([]string, error) {
	var p unstable.Parser
	p.Reset(data)
	var order []string
	seen := map[string]bool{}
	for p.NextExpression() {
		e := p.Expression()
		if e.Kind != unstable.Table {
			continue
		}
		var parts []string
		for it := e.Key(); it.Next(); {
			parts = append(parts, string(it.Node().Data))
		}
		if len(parts) < 2 || parts[0] != "host" || seen[parts[1]] {
			continue
		}
		seen[parts[1]] = true
		order = append(order, parts[1])
	}
	return order, p.Error()
}

// hostEndpoint turns one host's keys into an Endpoint. server is
// "[scheme://]host[:port][/path]"; empty means the registry itself.
func hostEndpoint(server, baseDir string, e hostFileEntry) (Endpoint, error) {
	ep := Endpoint{Scheme: "https", Root: "/v2"}
	if server != "" {
		if !strings.HasPrefix(server, "http://") && !strings.HasPrefix(server, "https://") {
			server = "https://" + server
		}
		u, err := url.Parse(server)
		if err != nil {
			return Endpoint{}, fmt.Errorf("not a URL: %w", err)
		}
		if u.Host == "" || u.User != nil || u.RawQuery != "" || u.Fragment != "" {
			return Endpoint{}, errors.New("not a registry URL like https://mirror.example.com:5000[/path]")
		}
		ep.Scheme, ep.Registry = u.Scheme, u.Host
		root := ""
		if u.Path != "" && u.Path != "/" {
			root = path.Clean(u.Path)
		}
		// Without override_path the path is where the /v2 API lives
		// below; with it, the path is the API root itself.
		switch {
		case e.OverridePath:
			ep.Root = root
		case strings.HasSuffix(root, "/v2"):
			ep.Root = root
		default:
			ep.Root = root + "/v2"
		}
	}
	if len(e.Capabilities) == 0 {
		ep.Resolve, ep.Pull = true, true
	}
	for _, c := range e.Capabilities {
		switch strings.ToLower(c) {
		case "pull":
			ep.Pull = true
		case "resolve":
			ep.Resolve = true
		case "push":
		default:
			return Endpoint{}, fmt.Errorf("unknown capability %q (pull, resolve or push)", c)
		}
	}
	if e.SkipVerify != nil {
		ep.SkipVerify = *e.SkipVerify
	}
	var cas []string
	switch v := e.CA.(type) {
	case nil:
	case string:
		cas = []string{v}
	case []any:
		for _, x := range v {
			s, ok := x.(string)
			if !ok {
				return Endpoint{}, fmt.Errorf("ca: %v is not a file name", x)
			}
			cas = append(cas, s)
		}
	default:
		return Endpoint{}, fmt.Errorf("ca: %v is not a file name or a list of them", v)
	}
	for _, f := range cas {
		if !filepath.IsAbs(f) {
			f = filepath.Join(baseDir, f)
		}
		pem, err := readCapped(f, maxCAFileSize)
		if err != nil {
			return Endpoint{}, fmt.Errorf("ca: %w", err)
		}
		if !x509.NewCertPool().AppendCertsFromPEM(pem) {
			return Endpoint{}, fmt.Errorf("ca: %s holds no PEM certificate", f)
		}
		ep.RootCAs = append(ep.RootCAs, pem...)
		ep.RootCAs = append(ep.RootCAs, '\n')
	}
	if len(e.Header) > 0 {
		ep.Header = http.Header{}
		keys := make([]string, 0, len(e.Header))
		for k := range e.Header {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		for _, k := range keys {
			switch v := e.Header[k].(type) {
			case string:
				ep.Header.Add(k, v)
			case []any:
				for _, x := range v {
					s, ok := x.(string)
					if !ok {
						return Endpoint{}, fmt.Errorf("header %q: %v is not a string", k, x)
					}
					ep.Header.Add(k, s)
				}
			default:
				return Endpoint{}, fmt.Errorf("header %q: %v is not a string or a list of strings", k, v)
			}
		}
	}
	return ep, nil
}

// describeTOMLError adds the line and column to a TOML syntax error.
func describeTOMLError(err error) error {
	var de *toml.DecodeError
	if errors.As(err, &de) {
		row, col := de.Position()
		return fmt.Errorf("line %d column %d: %w", row, col, err)
	}
	var pe *unstable.ParserError
	if errors.As(err, &pe) {
		return fmt.Errorf("TOML syntax: %s", pe.Message)
	}
	return err
}

// readCapped reads a file of at most limit bytes.
func readCapped(file string, limit int64) ([]byte, error) {
	f, err := os.Open(file)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, err
	}
	if !st.Mode().IsRegular() {
		return nil, fmt.Errorf("%s is not a regular file", file)
	}
	if st.Size() > limit {
		return nil, fmt.Errorf("%s is %d bytes, over the limit of %d", file, st.Size(), limit)
	}
	b := make([]byte, st.Size())
	n, err := f.ReadAt(b, 0)
	if err != nil && n != len(b) {
		return nil, err
	}
	return b[:n], nil
}
