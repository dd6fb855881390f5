{{/* Chart name, truncated to the 63 characters a label value allows. */}}
{{- define "nym-node.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Object name prefix: the release name, plus the chart name unless it already holds it.
52 characters at most: the StatefulSet controller labels each pod with the StatefulSet's name
and an 11-character revision hash, and a label value holds 63. */}}
{{- define "nym-node.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 52 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "nym-node.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels that never change for a release: the pods' selector. */}}
{{- define "nym-node.selectorLabels" -}}
app.kubernetes.io/name: {{ include "nym-node.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Labels of everything but the selector's pods' siblings. */}}
{{- define "nym-node.commonLabels" -}}
helm.sh/chart: {{ include "nym-node.chart" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "nym-node.labels" -}}
{{ include "nym-node.commonLabels" . }}
{{ include "nym-node.selectorLabels" . }}
app.kubernetes.io/component: {{ .Values.mode }}
{{- with .Values.layer }}
mixnet.nym-node.dev/layer: {{ . | quote }}
{{- end }}
{{- end }}

{{/* The `helm test` pod: the release's labels but not the selector's name, so neither the
Services nor the PodDisruptionBudget select it. */}}
{{- define "nym-node.testLabels" -}}
{{ include "nym-node.commonLabels" . }}
app.kubernetes.io/name: {{ include "nym-node.name" . | trunc 58 | trimSuffix "-" }}-test
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: test
{{- end }}

{{- define "nym-node.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end }}

{{- define "nym-node.isGateway" -}}
{{- if ne .Values.mode "mixnode" }}true{{- end }}
{{- end }}

{{/* "true" when the chart mounts an exit policy of its own (exit gateways with exitPolicy set). */}}
{{- define "nym-node.exitPolicy" -}}
{{- if and (eq .Values.mode "exit-gateway") .Values.exitPolicy }}true{{- end }}
{{- end }}

{{/* One env value as the node reads it. YAML numbers reach templates as floats
(2147483648 would print as 2.147483648e+09): whole numbers print as integers. */}}
{{- define "nym-node.envValue" -}}
{{- if kindIs "float64" . -}}
{{- if eq . (floor .) }}{{ printf "%.0f" . }}{{ else }}{{ toString . }}{{ end -}}
{{- else if or (kindIs "int" .) (kindIs "int64" .) -}}
{{- printf "%d" . -}}
{{- else -}}
{{- toString . -}}
{{- end -}}
{{- end }}

{{/* The node's environment (the env ConfigMap's data; its hash rolls the pods). */}}
{{- define "nym-node.envData" -}}
NYM_NODE_MODE: {{ .Values.mode | quote }}
NYM_NODE_KEYS_DIR: /var/lib/nym-node/keys
NYM_NODE_DATA_DIR: /var/lib/nym-node/data
NYM_NODE_MIXNET_BIND: {{ printf "0.0.0.0:%v" .Values.ports.mixnet | quote }}
NYM_NODE_HTTP_BIND: {{ printf "0.0.0.0:%v" .Values.ports.http | quote }}
NYM_NODE_CLIENT_BIND: {{ printf "0.0.0.0:%v" .Values.ports.client | quote }}
{{- range $key, $value := .Values.config }}
{{- if and (eq $key "NYM_NODE_TOPOLOGY") (eq (toString $value) "") }}
NYM_NODE_TOPOLOGY: /etc/nym-node/topology/topology.json
{{- else if and (eq $key "NYM_NODE_EXIT_POLICY") (eq (toString $value) "") (include "nym-node.exitPolicy" $) }}
NYM_NODE_EXIT_POLICY: /etc/nym-node/exit-policy/exit-policy.txt
{{- else if and (eq $key "NYM_NODE_IPR_ENABLED") $.Values.ipPacketRouter.enabled }}
NYM_NODE_IPR_ENABLED: "true"
{{- else }}
{{ $key }}: {{ include "nym-node.envValue" $value | quote }}
{{- end }}
{{- end }}
{{- if and .Values.ipPacketRouter.enabled (not (hasKey .Values.config "NYM_NODE_IPR_ENABLED")) }}
NYM_NODE_IPR_ENABLED: "true"
{{- end }}
{{- end }}

{{/* NYM_NODE_DRAIN_GRACE in whole seconds (forms: 500ms, 5s, 5m, 1h). */}}
{{- define "nym-node.drainSeconds" -}}
{{- $g := include "nym-node.envValue" (default "5s" .Values.config.NYM_NODE_DRAIN_GRACE) }}
{{- if eq $g "0" }}0
{{- else if hasSuffix "ms" $g }}0
{{- else if hasSuffix "s" $g }}{{ trimSuffix "s" $g | int }}
{{- else if hasSuffix "m" $g }}{{ mul (trimSuffix "m" $g | int) 60 }}
{{- else if hasSuffix "h" $g }}{{ mul (trimSuffix "h" $g | int) 3600 }}
{{- else }}{{ fail (printf "config.NYM_NODE_DRAIN_GRACE: expected a duration such as 5s (got %q)" $g) }}
{{- end }}
{{- end }}

{{/* A release within the cluster: its namespace and name (labels the targets its alerts and
dashboards select). */}}
{{- define "nym-node.releaseKey" -}}
{{- printf "%s/%s" .Release.Namespace .Release.Name -}}
{{- end }}
