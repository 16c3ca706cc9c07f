package manifests

// The examples' Envoy configs against Envoy's own API, without Envoy: each one
// is decoded strictly into its Envoy v3 proto (go-control-plane) with
// protojson, as Envoy parses a bootstrap (YAML to JSON, then proto JSON),
// every typed_config Any is resolved and decoded too, and every message is
// validated with its protoc-gen-validate rules (ValidateAll), which are the
// constraints Envoy enforces on load. Then each Wasm vm_config must name a
// known runtime and load code.local.filename from the wasm-csi volume of the
// container that runs that Envoy.

import (
	"encoding/json"
	"errors"
	"fmt"
	"path"
	"slices"
	"strings"
	"testing"

	bootstrapv3 "github.com/envoyproxy/go-control-plane/envoy/config/bootstrap/v3"
	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	wasmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/wasm/v3"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/types/known/anypb"
	corev1 "k8s.io/api/core/v1"
	"sigs.k8s.io/yaml"

	"github.com/wasm-csi/wasm-csi/csi"
	"github.com/wasm-csi/wasm-csi/node"

	// The typed_config types the examples use, registered in
	// protoregistry.GlobalTypes so that protojson resolves their Anys. (The
	// packages imported above register WasmService and HttpConnectionManager.)
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/router/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/wasm/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/wasm/v3"
)

// envoyConfig is an Envoy config found in an example document.
type envoyConfig struct {
	doc   doc
	where string        // where in the document, e.g. "spec.configPatches[0].patch.value"
	msg   proto.Message // a new message of the type Envoy decodes it into
	json  []byte        // the config as JSON
}

func (c envoyConfig) String() string {
	return fmt.Sprintf("%s %s (%s)", c.doc.src, c.where, c.msg.ProtoReflect().Descriptor().FullName())
}

// envoyFilterTypes maps an EnvoyFilter patch's applyTo to the Envoy type its
// value is: Istio decodes the value into that type and merges or inserts it
// (pilot/pkg/networking/core/envoyfilter; BOOTSTRAP in the istio-agent).
var envoyFilterTypes = map[string]func() proto.Message{
	// A BOOTSTRAP patch is MERGE only, and Istio applies it as a proto
	// merge of the value, decoded as a (partial) Bootstrap, into the
	// bootstrap (proto.Merge: singular fields replaced, lists appended).
	// So decoding the value as a Bootstrap is exactly what Istio does, and
	// a value that does not decode or validate as one is refused (or, worse,
	// silently dropped) there.
	"BOOTSTRAP":           func() proto.Message { return &bootstrapv3.Bootstrap{} },
	"LISTENER":            func() proto.Message { return &listenerv3.Listener{} },
	"FILTER_CHAIN":        func() proto.Message { return &listenerv3.FilterChain{} },
	"NETWORK_FILTER":      func() proto.Message { return &listenerv3.Filter{} },
	"HTTP_FILTER":         func() proto.Message { return &hcmv3.HttpFilter{} },
	"LISTENER_FILTER":     func() proto.Message { return &listenerv3.ListenerFilter{} },
	"ROUTE_CONFIGURATION": func() proto.Message { return &routev3.RouteConfiguration{} },
	"VIRTUAL_HOST":        func() proto.Message { return &routev3.VirtualHost{} },
	"HTTP_ROUTE":          func() proto.Message { return &routev3.Route{} },
	"CLUSTER":             func() proto.Message { return &clusterv3.Cluster{} },
	"EXTENSION_CONFIG":    func() proto.Message { return &corev3.TypedExtensionConfig{} },
}

// envoyConfigs finds the Envoy configs in the examples: EnvoyFilter patch
// values, an EnvoyProxy's bootstrap, and the ConfigMap keys a container
// runs Envoy with (envoy -c / --config-path, ISTIO_BOOTSTRAP_OVERRIDE).
func envoyConfigs(t *testing.T, all []doc) []envoyConfig {
	t.Helper()
	var out []envoyConfig
	add := func(d doc, where string, msg proto.Message, v any) {
		var j []byte
		var err error
		if s, ok := v.(string); ok { // a file's content, YAML or JSON
			j, err = yaml.YAMLToJSONStrict([]byte(s))
		} else {
			j, err = json.Marshal(v)
		}
		if err != nil {
			t.Errorf("%s %s: not YAML or JSON: %v", d.src, where, err)
			return
		}
		out = append(out, envoyConfig{doc: d, where: where, msg: msg, json: j})
	}

	// ConfigMap keys containers run Envoy with.
	configFiles := map[string]bool{} // namespace/configmap/key
	for _, d := range all {
		for _, pt := range podSpecsIn(d.obj) {
			spec := pt.typed(t, d.src)
			for _, c := range spec.Containers {
				files := envoyConfigFiles(c)
				for _, f := range files {
					if !slices.ContainsFunc(c.VolumeMounts, func(m corev1.VolumeMount) bool { return under(f, m.MountPath) }) {
						continue // TestExampleConfigFiles reports it
					}
					m, v := mountFor(t, spec, c, f)
					if v.ConfigMap != nil {
						key := strings.TrimPrefix(path.Clean(f), path.Clean(m.MountPath)+"/")
						configFiles[d.namespace()+"/"+v.ConfigMap.Name+"/"+key] = true
					}
				}
			}
		}
	}

	for _, d := range all {
		switch d.kind() {
		case "EnvoyFilter":
			for i, p := range asList(mapAt(d.obj, "spec")["configPatches"]) {
				where := fmt.Sprintf("spec.configPatches[%d].patch.value", i)
				newMsg, ok := envoyFilterTypes[str(p, "applyTo")]
				if !ok {
					t.Errorf("%s %s: applyTo %q: add its Envoy type to envoyFilterTypes", d.src, where, str(p, "applyTo"))
					continue
				}
				if v, ok := get(p, "patch", "value"); ok {
					add(d, where, newMsg(), v)
				}
			}
		case "EnvoyProxy":
			// Merge and Replace values are bootstraps: Envoy Gateway decodes
			// the value as a Bootstrap (and, for Merge, proto-merges it into
			// its default one). JSONPatch needs the default bootstrap.
			b := mapAt(d.obj, "spec", "bootstrap")
			if typ := str(b, "type"); typ == "Merge" || typ == "Replace" {
				add(d, "spec.bootstrap.value", &bootstrapv3.Bootstrap{}, str(b, "value"))
			} else if b != nil {
				t.Errorf("%s: spec.bootstrap.type %q: this test validates Merge and Replace only", d, typ)
			}
		case "ConfigMap":
			data := mapAt(d.obj, "data")
			for _, key := range slices.Sorted(mapKeys(data)) {
				if configFiles[d.namespace()+"/"+d.name()+"/"+key] {
					add(d, "data."+key, &bootstrapv3.Bootstrap{}, str(data, key))
				}
			}
		}
	}
	return out
}

// validator is what protoc-gen-validate generates on every Envoy message.
type validator interface{ ValidateAll() error }

// decodeEnvoy decodes j strictly into msg (unknown or duplicate fields,
// unresolvable Any types and wrong value types refused, as Envoy refuses
// them) and validates it and every message it holds, Anys unpacked, with
// their protoc-gen-validate rules. It returns the Wasm VM configs found,
// keyed by where they are.
func decodeEnvoy(j []byte, msg proto.Message) ([]vmConfigAt, error) {
	if err := (protojson.UnmarshalOptions{}).Unmarshal(j, msg); err != nil {
		return nil, fmt.Errorf("does not decode as %s: %w", msg.ProtoReflect().Descriptor().FullName(), err)
	}
	var vms []vmConfigAt
	var errs []error
	var walk func(m protoreflect.Message, where string)
	// validate checks m and, as ValidateAll recurses into fields but not
	// into Anys, every message in it but Anys' contents.
	validate := func(m protoreflect.Message, where string) {
		if v, ok := m.Interface().(validator); ok {
			if err := v.ValidateAll(); err != nil {
				errs = append(errs, fmt.Errorf("%s: invalid %s: %w", where, m.Descriptor().FullName(), err))
			}
		} else if m.Descriptor().ParentFile().Package() != "google.protobuf" {
			// Well-known types have no rules; Envoy's (and xDS's) all do.
			errs = append(errs, fmt.Errorf("%s: %s has no protoc-gen-validate rules", where, m.Descriptor().FullName()))
		}
	}
	walk = func(m protoreflect.Message, where string) {
		if a, ok := m.Interface().(*anypb.Any); ok {
			// protojson has decoded the content strictly already; this
			// unpacks it to validate it and look inside.
			inner, err := a.UnmarshalNew()
			if err != nil {
				errs = append(errs, fmt.Errorf("%s: %w", where, err))
				return
			}
			m = inner.ProtoReflect()
			where += "(" + string(m.Descriptor().FullName()) + ")"
			validate(m, where)
		}
		if vm, ok := m.Interface().(*wasmv3.VmConfig); ok {
			vms = append(vms, vmConfigAt{where: where, vm: vm})
		}
		m.Range(func(fd protoreflect.FieldDescriptor, v protoreflect.Value) bool {
			w := where + "." + string(fd.Name())
			switch {
			case fd.IsList() && fd.Message() != nil:
				for i := range v.List().Len() {
					walk(v.List().Get(i).Message(), fmt.Sprintf("%s[%d]", w, i))
				}
			case fd.IsMap() && fd.MapValue().Message() != nil:
				v.Map().Range(func(k protoreflect.MapKey, mv protoreflect.Value) bool {
					walk(mv.Message(), fmt.Sprintf("%s[%v]", w, k))
					return true
				})
			case !fd.IsList() && !fd.IsMap() && fd.Message() != nil:
				walk(v.Message(), w)
			}
			return true
		})
	}
	validate(msg.ProtoReflect(), "")
	walk(msg.ProtoReflect(), "")
	return vms, errors.Join(errs...)
}

// vmConfigAt is a Wasm VM config found in an Envoy config.
type vmConfigAt struct {
	where string
	vm    *wasmv3.VmConfig
}

// wasmRuntimes are the runtimes Envoy can load a module file with: V8 is
// the official build's; WAMR and Wasmtime need a custom build. (The null
// runtime runs code linked into Envoy, not a file.)
var wasmRuntimes = []string{"envoy.wasm.runtime.v8", "envoy.wasm.runtime.wamr", "envoy.wasm.runtime.wasmtime"}

// checkEnvoyConfig decodes and validates c (see decodeEnvoy), then checks its
// Wasm VM configs: a known runtime, and code from a local file that is the
// module on the wasm-csi volume of every container that runs this Envoy. It
// returns the VM configs found.
func checkEnvoyConfig(t *testing.T, c envoyConfig, all []doc) ([]vmConfigAt, error) {
	t.Helper()
	vms, err := decodeEnvoy(c.json, proto.Clone(c.msg))
	if err != nil {
		return vms, err
	}
	cs := consumers(t, c.doc, all)
	var errs []error
	for _, v := range vms {
		if rt := v.vm.GetRuntime(); !slices.Contains(wasmRuntimes, rt) {
			errs = append(errs, fmt.Errorf("%s.runtime %q is not one of %v", v.where, rt, wasmRuntimes))
		}
		fn := v.vm.GetCode().GetLocal().GetFilename()
		if fn == "" {
			errs = append(errs, fmt.Errorf("%s.code is not local.filename: the module would not come from the wasm-csi volume", v.where))
			continue
		}
		if len(cs) == 0 {
			errs = append(errs, fmt.Errorf("%s loads %s, but no container in the examples runs this config", v.where, fn))
		}
		for _, con := range cs {
			if err := onWasmVolume(t, con, fn); err != nil {
				errs = append(errs, fmt.Errorf("%s.code.local.filename: %w", v.where, err))
			}
		}
	}
	return vms, errors.Join(errs...)
}

// onWasmVolume checks that file, in container c, is the module on a
// wasm-csi volume: the volume's mountPath joined with its fileName attribute.
func onWasmVolume(t *testing.T, c consumer, file string) error {
	t.Helper()
	if !slices.ContainsFunc(c.container.VolumeMounts, func(m corev1.VolumeMount) bool { return under(file, m.MountPath) }) {
		return fmt.Errorf("%s is on no volume mount of container %s of %s", file, c.container.Name, c.src)
	}
	m, v := mountFor(t, c.spec, c.container, file)
	if v.CSI == nil || v.CSI.Driver != csi.DefaultDriverName {
		return fmt.Errorf("%s is on volume %q of container %s of %s, which is not a %s volume", file, v.Name, c.container.Name, c.src, csi.DefaultDriverName)
	}
	name := node.DefaultFileName
	if fn, ok := v.CSI.VolumeAttributes[csi.AttrFileName]; ok {
		name = fn
	}
	if want := path.Join(m.MountPath, name); path.Clean(file) != want {
		return fmt.Errorf("%s: container %s of %s has the module of volume %q at %s", file, c.container.Name, c.src, v.Name, want)
	}
	return nil
}

// The configs this test must find: a change to the examples that moves one
// out of its reach fails here rather than going unchecked.
var wantEnvoyConfigs = []string{
	"manifests/examples/envoy-gateway.yaml spec.bootstrap.value (envoy.config.bootstrap.v3.Bootstrap)",
	"manifests/examples/istio-http-wasm-filter.yaml spec.configPatches[0].patch.value (envoy.extensions.filters.network.http_connection_manager.v3.HttpFilter)",
	"manifests/examples/istio-ingressgateway-bootstrap-override.yaml data.custom_bootstrap.json (envoy.config.bootstrap.v3.Bootstrap)",
	"manifests/examples/istio-ingressgateway.yaml spec.configPatches[0].patch.value (envoy.config.bootstrap.v3.Bootstrap)",
	"manifests/examples/plain-envoy.yaml data.envoy.yaml (envoy.config.bootstrap.v3.Bootstrap)",
}

func TestExampleEnvoyConfigs(t *testing.T) {
	all := exampleDocs(t)
	configs := envoyConfigs(t, all)
	var found []string
	vmsIn := map[string]int{} // document -> Wasm VM configs validated in it
	for _, c := range configs {
		file, _, _ := strings.Cut(c.doc.src, "#")
		found = append(found, fmt.Sprintf("%s %s (%s)", file, c.where, c.msg.ProtoReflect().Descriptor().FullName()))
		vms, err := checkEnvoyConfig(t, c, all)
		if err != nil {
			t.Errorf("%s: %v", c, err)
		}
		vmsIn[c.doc.src] += len(vms)
		for _, v := range vms {
			t.Logf("%s%s: runtime %s, %s", c, v.where, v.vm.GetRuntime(), v.vm.GetCode().GetLocal().GetFilename())
		}
	}
	slices.Sort(found)
	for _, w := range wantEnvoyConfigs {
		if !slices.Contains(found, w) {
			t.Errorf("not validated against Envoy's API: %s (found %q)", w, found)
		}
	}
	// Every Wasm config in the examples (found by walking the YAML, as
	// TestExampleWasmFilenames does) is in a config validated here.
	for _, d := range all {
		if n := len(wasmFilenames(t, d.src, d.obj)); n != vmsIn[d.src] {
			t.Errorf("%s has %d Wasm vm_configs, but %d were validated against Envoy's API: is one in a place envoyConfigs does not look?", d, n, vmsIn[d.src])
		}
	}
}

// Deliberately broken copies of the examples' configs fail: the checks
// above would catch these mistakes in an example.
func TestBrokenEnvoyConfigsFail(t *testing.T) {
	all := exampleDocs(t)
	configs := envoyConfigs(t, all)
	const (
		istioBootstrap = "istio-ingressgateway.yaml"
		override       = "istio-ingressgateway-bootstrap-override.yaml"
		envoyGateway   = "envoy-gateway.yaml"
		plain          = "plain-envoy.yaml"
		httpFilter     = "istio-http-wasm-filter.yaml"
		local          = `{"local":{"filename":"/etc/wasm/plugin.wasm"}}`
	)
	for _, tc := range []struct {
		name     string
		file     string // the example (base name)
		old, new string // replaced once in the config's JSON
		want     string // in the error
	}{
		{"misspelled field", istioBootstrap, `"bootstrap_extensions":`, `"bootstrap_extension":`,
			`unknown field "bootstrap_extension"`},
		{"misspelled field in typed_config", istioBootstrap, `"filename":`, `"file_name":`,
			`unknown field "file_name"`},
		{"misspelled field in a JSON override", override, `"vm_config":`, `"vm_configs":`,
			`unknown field "vm_configs"`},
		{"misspelled field in EnvoyProxy bootstrap", envoyGateway, `"singleton":`, `"singletons":`,
			`unknown field "singletons"`},
		{"unknown @type", istioBootstrap, `envoy.extensions.wasm.v3.WasmService`, `envoy.extensions.wasm.v3.WasmServce`,
			`unable to resolve`},
		{"@type of another message", istioBootstrap, `envoy.extensions.wasm.v3.WasmService`, `envoy.extensions.filters.http.wasm.v3.Wasm`,
			`unknown field "singleton"`},
		{"@type of the router misspelled", plain, `envoy.extensions.filters.http.router.v3.Router`, `envoy.extensions.filters.http.router.v3.Routr`,
			`unable to resolve`},
		{"wrong value type", istioBootstrap, `"singleton":true`, `"singleton":"yes"`,
			`invalid value for bool`},
		{"duplicate field", envoyGateway, `"runtime":"envoy.wasm.runtime.v8"`, `"runtime":"envoy.wasm.runtime.v8","runtime":"envoy.wasm.runtime.v8"`,
			`duplicate field`},
		{"code with no source (validate: required)", istioBootstrap, local, `{"local":{}}`,
			`DataSource.Specifier: value is required`},
		{"port out of range (validate: lte)", plain, `"port_value":10000`, `"port_value":70000`,
			`PortValue: value must be less than or equal to 65535`},
		{"HTTP filter without a name (validate: min_len)", httpFilter, `"name":"envoy.filters.http.wasm"`, `"name":""`,
			`HttpFilter.Name: value length must be at least 1`},
		{"unknown runtime", override, `envoy.wasm.runtime.v8`, `envoy.wasm.runtime.v9`,
			`runtime "envoy.wasm.runtime.v9" is not one of`},
		{"null runtime", httpFilter, `envoy.wasm.runtime.v8`, `envoy.wasm.runtime.null`,
			`runtime "envoy.wasm.runtime.null" is not one of`},
		{"remote code", istioBootstrap, local, `{"remote":{"http_uri":{"uri":"https://example.com/p.wasm","cluster":"c","timeout":"5s"},"sha256":"00"}}`,
			`code is not local.filename`},
		{"inline code", envoyGateway, local, `{"local":{"inline_string":"x"}}`,
			`code is not local.filename`},
		{"file off the volume", istioBootstrap, `/etc/wasm/plugin.wasm`, `/etc/wasm-other/plugin.wasm`,
			`is on no volume mount`},
		{"wrong file on the volume", plain, `/etc/wasm/header.wasm`, `/etc/wasm/plugin.wasm`,
			`has the module of volume "wasm" at /etc/wasm/header.wasm`},
		{"file on the bootstrap ConfigMap volume", override, `/etc/wasm/plugin.wasm`, `/etc/istio/wasm-bootstrap/plugin.wasm`,
			`which is not a wasm.csi.dev volume`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var c *envoyConfig
			for i := range configs {
				if file, _, _ := strings.Cut(configs[i].doc.src, "#"); path.Base(file) == tc.file {
					c = &configs[i]
					break
				}
			}
			if c == nil {
				t.Fatalf("no Envoy config in %s", tc.file)
			}
			if !strings.Contains(string(c.json), tc.old) {
				t.Fatalf("%s does not contain %s: update this case\n%s", c, tc.old, c.json)
			}
			broken := *c
			broken.json = []byte(strings.Replace(string(c.json), tc.old, tc.new, 1))
			_, err := checkEnvoyConfig(t, broken, all)
			if err == nil {
				t.Fatalf("%s with %s -> %s passes", c, tc.old, tc.new)
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Errorf("error %q does not contain %q", err, tc.want)
			}
		})
	}
}
