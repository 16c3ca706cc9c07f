{{/*
Labels. The first two are the ones manifests/base sets; the rest are Helm's
own, which test/manifests allows as the only difference between the two.
*/}}
{{- define "wasm-csi.labels" -}}
app.kubernetes.io/name: wasm-csi
app.kubernetes.io/component: node
{{ include "wasm-csi.helmLabels" . }}
{{- end }}

{{- define "wasm-csi.helmLabels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}

{{/* The DaemonSet's selector: immutable, the same as manifests/base's. */}}
{{- define "wasm-csi.selectorLabels" -}}
app.kubernetes.io/name: wasm-csi
app.kubernetes.io/component: node
{{- end }}

{{- define "wasm-csi.namespace" -}}
{{ .Values.namespace.name | default .Release.Namespace }}
{{- end }}

{{- define "wasm-csi.image" -}}
{{- if .Values.image.digest -}}
{{ .Values.image.repository }}@{{ .Values.image.digest }}
{{- else -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end }}
{{- end }}

{{/* The CSI socket's directory on the host, where kubelet looks for it. */}}
{{- define "wasm-csi.pluginDir" -}}
/var/lib/kubelet/plugins/{{ .Values.driverName }}
{{- end }}

{{- define "wasm-csi.metricsAddress" -}}
{{ .Values.metrics.host }}:{{ .Values.metrics.port }}
{{- end }}

{{/*
The ValidatingAdmissionPolicy's list as a CEL list literal: the values'
admissionPolicy.patterns, else the driver's own config.registries.allowed,
so that the two lists are one unless set apart.
*/}}
{{- define "wasm-csi.admissionPatterns" -}}
{{- $patterns := .Values.admissionPolicy.patterns | default ((.Values.config.registries | default dict).allowed) | default list -}}
{{- if not $patterns -}}
{{- fail "admissionPolicy.enabled needs the images pods may name: set admissionPolicy.patterns or config.registries.allowed" -}}
{{- end -}}
{{- $quoted := list -}}
{{- range $patterns -}}
{{- if or (contains "'" .) (contains "\\" .) -}}
{{- fail (printf "admissionPolicy: pattern %q is not HOST[:PORT][/PATH]" .) -}}
{{- end -}}
{{- $quoted = append $quoted (printf "'%s'" .) -}}
{{- end -}}
[{{ join ", " $quoted }}]
{{- end }}
