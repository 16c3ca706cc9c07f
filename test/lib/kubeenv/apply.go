package kubeenv

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"sort"
	"time"

	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/util/yaml"
)

// FieldManager is the server-side apply field manager of ApplyYAML.
const FieldManager = "kubeenv"

// ApplyYAML applies every object of multi-document YAML (or JSON; a List's
// items count as objects) as the admin, with server-side apply (create for an
// object with only generateName), and returns the objects as stored.
// Namespaces and CustomResourceDefinitions go first, then the rest in order;
// a namespaced object without a namespace goes to "default". Any kind the
// apiserver serves works: core, rbac, storage, apps, ...
func (e *Env) ApplyYAML(ctx context.Context, data []byte) ([]*unstructured.Unstructured, error) {
	objs, err := DecodeYAML(data)
	if err != nil {
		return nil, err
	}
	sort.SliceStable(objs, func(i, j int) bool { return applyRank(objs[i]) < applyRank(objs[j]) })
	out := make([]*unstructured.Unstructured, 0, len(objs))
	for _, obj := range objs {
		got, err := e.applyOne(ctx, obj)
		if err != nil {
			return out, err
		}
		out = append(out, got)
	}
	return out, nil
}

// ApplyFile is ApplyYAML of a file's contents.
func (e *Env) ApplyFile(ctx context.Context, path string) ([]*unstructured.Unstructured, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	objs, err := e.ApplyYAML(ctx, data)
	if err != nil {
		return objs, fmt.Errorf("%s: %w", path, err)
	}
	return objs, nil
}

// ApplyKustomize renders a kustomization directory with `kubectl kustomize`
// (BinDir/kubectl) and applies the result with ApplyYAML: the same objects
// `kubectl apply -k dir` makes.
func (e *Env) ApplyKustomize(ctx context.Context, dir string) ([]*unstructured.Unstructured, error) {
	data, err := e.Kubectl(ctx, "kustomize", dir)
	if err != nil {
		return nil, err
	}
	objs, err := e.ApplyYAML(ctx, data)
	if err != nil {
		return objs, fmt.Errorf("kustomization %s: %w", dir, err)
	}
	return objs, nil
}

// DecodeYAML splits multi-document YAML or JSON into objects, expanding
// Lists and skipping empty documents.
func DecodeYAML(data []byte) ([]*unstructured.Unstructured, error) {
	dec := yaml.NewYAMLOrJSONDecoder(bytes.NewReader(data), 4096)
	var objs []*unstructured.Unstructured
	for i := 0; ; i++ {
		var m map[string]any
		if err := dec.Decode(&m); err != nil {
			if errors.Is(err, io.EOF) {
				return objs, nil
			}
			return nil, fmt.Errorf("document %d: %w", i, err)
		}
		if len(m) == 0 {
			continue
		}
		u := &unstructured.Unstructured{Object: m}
		if u.IsList() {
			list, err := u.ToList()
			if err != nil {
				return nil, fmt.Errorf("document %d: %w", i, err)
			}
			for k := range list.Items {
				objs = append(objs, &list.Items[k])
			}
			continue
		}
		if u.GetKind() == "" || u.GetAPIVersion() == "" {
			return nil, fmt.Errorf("document %d: no apiVersion or kind", i)
		}
		objs = append(objs, u)
	}
}

func applyRank(u *unstructured.Unstructured) int {
	switch u.GroupVersionKind().GroupKind().String() {
	case "Namespace", "CustomResourceDefinition.apiextensions.k8s.io":
		return 0
	}
	return 1
}

func (e *Env) applyOne(ctx context.Context, obj *unstructured.Unstructured) (*unstructured.Unstructured, error) {
	gvk := obj.GroupVersionKind()
	what := gvk.Kind + " " + obj.GetName()
	var mapping *meta.RESTMapping
	deadline := time.Now().Add(10 * time.Second)
	for {
		var err error
		mapping, err = e.mapper.RESTMapping(gvk.GroupKind(), gvk.Version)
		if err == nil {
			break
		}
		// A kind just added (a CRD applied above) shows up in discovery a
		// moment later.
		if !meta.IsNoMatchError(err) || time.Now().After(deadline) {
			return nil, fmt.Errorf("%s: %w", what, err)
		}
		e.mapper.Reset()
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("%s: %w", what, err)
		case <-time.After(200 * time.Millisecond):
		}
	}
	ri := e.Dynamic.Resource(mapping.Resource)
	var client interface {
		Apply(context.Context, string, *unstructured.Unstructured, metav1.ApplyOptions, ...string) (*unstructured.Unstructured, error)
		Create(context.Context, *unstructured.Unstructured, metav1.CreateOptions, ...string) (*unstructured.Unstructured, error)
	} = ri
	if mapping.Scope.Name() == meta.RESTScopeNameNamespace {
		if obj.GetNamespace() == "" {
			obj.SetNamespace(metav1.NamespaceDefault)
		}
		client = ri.Namespace(obj.GetNamespace())
		what = gvk.Kind + " " + obj.GetNamespace() + "/" + obj.GetName()
	}
	var got *unstructured.Unstructured
	var err error
	if obj.GetName() == "" && obj.GetGenerateName() != "" {
		got, err = client.Create(ctx, obj, metav1.CreateOptions{FieldManager: FieldManager})
	} else {
		got, err = client.Apply(ctx, obj.GetName(), obj, metav1.ApplyOptions{FieldManager: FieldManager, Force: true})
	}
	if err != nil {
		return nil, fmt.Errorf("apply %s: %w", what, err)
	}
	return got, nil
}
