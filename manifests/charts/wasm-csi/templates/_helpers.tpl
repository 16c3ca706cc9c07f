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
