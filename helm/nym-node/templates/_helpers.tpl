{{/* Chart name, truncated to the 63 characters a label value allows. */}}
{{- define "nym-node.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Object name prefix: the release name, plus the chart name unless it already holds it. */}}
{{- define "nym-node.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
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

{{- define "nym-node.labels" -}}
helm.sh/chart: {{ include "nym-node.chart" . }}
{{ include "nym-node.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: {{ .Values.mode }}
{{- with .Values.layer }}
mixnet.nym-node.dev/layer: {{ . | quote }}
{{- end }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
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

{{/* Mode and layer must agree; the schema checks types, this checks the combination. */}}
{{- define "nym-node.validate" -}}
{{- if and (eq .Values.mode "mixnode") (not .Values.layer) }}
{{- fail "a mixnode needs layer (1, 2 or 3)" }}
{{- end }}
{{- if and (ne .Values.mode "mixnode") .Values.layer }}
{{- fail "gateways have no layer: set layer to null" }}
{{- end }}
{{- if and .Values.exitPolicy (ne .Values.mode "exit-gateway") }}
{{- fail "exitPolicy applies to exit gateways only: set mode to exit-gateway or leave exitPolicy empty" }}
{{- end }}
{{- if and .Values.keys.existingSecret (gt (int .Values.replicaCount) 1) }}
{{- fail "keys.existingSecret holds one node's keys: use it with replicaCount 1" }}
{{- end }}
{{- end }}

{{/* NYM_NODE_DRAIN_GRACE in whole seconds (forms: 500ms, 5s, 5m, 1h). */}}
{{- define "nym-node.drainSeconds" -}}
{{- $g := toString (default "5s" .Values.config.NYM_NODE_DRAIN_GRACE) }}
{{- if hasSuffix "ms" $g }}0
{{- else if hasSuffix "s" $g }}{{ trimSuffix "s" $g | int }}
{{- else if hasSuffix "m" $g }}{{ mul (trimSuffix "m" $g | int) 60 }}
{{- else if hasSuffix "h" $g }}{{ mul (trimSuffix "h" $g | int) 3600 }}
{{- else }}{{ fail (printf "config.NYM_NODE_DRAIN_GRACE: expected a duration such as 5s (got %q)" $g) }}
{{- end }}
{{- end }}
