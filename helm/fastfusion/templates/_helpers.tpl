{{/*
Names, labels and the per-worker settings every template shares.
*/}}

{{/* The chart name, or nameOverride. */}}
{{- define "fastfusion.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
`<release>-<chart>` (just the release when it already contains the chart name), or fullnameOverride.
Truncated to leave room for the longest suffix ("-worker-" + a worker name) in a 63-character name.
*/}}
{{- define "fastfusion.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 30 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 30 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 30 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "fastfusion.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every resource. */}}
{{- define "fastfusion.labels" -}}
helm.sh/chart: {{ include "fastfusion.chart" . }}
app.kubernetes.io/name: {{ include "fastfusion.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* Selector of the gateway's pods. */}}
{{- define "fastfusion.gateway.selectorLabels" -}}
app.kubernetes.io/name: {{ include "fastfusion.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: gateway
{{- end }}

{{- define "fastfusion.gateway.fullname" -}}
{{- printf "%s-gateway" (include "fastfusion.fullname" .) }}
{{- end }}

{{- define "fastfusion.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "fastfusion.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* An image reference; the tag defaults to the chart's appVersion. Call with (list $image $root). */}}
{{- define "fastfusion.image" -}}
{{- $image := index . 0 }}
{{- $root := index . 1 }}
{{- printf "%s:%s" $image.repository (default $root.Chart.AppVersion $image.tag) }}
{{- end }}

{{/*
A worker entry merged over workerDefaults (the entry's keys win, maps merged deeply), as YAML.
Call with (list $worker $root) and read it back with fromYaml.
*/}}
{{- define "fastfusion.worker.settings" -}}
{{- $worker := index . 0 }}
{{- $root := index . 1 }}
{{- mergeOverwrite (deepCopy $root.Values.workerDefaults) (deepCopy $worker) | toYaml }}
{{- end }}

{{/* Name of a worker's Deployment, headless Service and ConfigMap. Call with (list $worker $root). */}}
{{- define "fastfusion.worker.fullname" -}}
{{- $worker := index . 0 }}
{{- $root := index . 1 }}
{{- printf "%s-worker-%s" (include "fastfusion.fullname" $root) $worker.name }}
{{- end }}

{{/* Selector of one worker entry's pods. Call with (list $worker $root). */}}
{{- define "fastfusion.worker.selectorLabels" -}}
{{- $worker := index . 0 }}
{{- $root := index . 1 -}}
app.kubernetes.io/name: {{ include "fastfusion.name" $root }}
app.kubernetes.io/instance: {{ $root.Release.Name }}
app.kubernetes.io/component: worker
fastfusion.io/worker: {{ $worker.name }}
{{- end }}

{{/*
FASTFUSION_WORKERS: every worker's headless Service as `name.namespace.svc:port`. The gateway
resolves each name to the ready pods behind it.
*/}}
{{- define "fastfusion.workerEndpoints" -}}
{{- $root := . }}
{{- $endpoints := list }}
{{- range .Values.workers }}
{{- $settings := include "fastfusion.worker.settings" (list . $root) | fromYaml }}
{{- $endpoints = append $endpoints (printf "%s.%s.svc:%v" (include "fastfusion.worker.fullname" (list . $root)) $root.Release.Namespace $settings.port) }}
{{- end }}
{{- join "," $endpoints }}
{{- end }}

{{/* The Secret holding the API keys. */}}
{{- define "fastfusion.apiKeysSecret" -}}
{{- default (printf "%s-api-keys" (include "fastfusion.fullname" .)) .Values.apiKeys.existingSecret }}
{{- end }}

{{/* The Secret holding the url signing key. */}}
{{- define "fastfusion.urlSigningSecret" -}}
{{- default (printf "%s-url-signing" (include "fastfusion.fullname" .)) .Values.urlSigning.existingSecret }}
{{- end }}

{{/* The Secret holding the S3 credentials. */}}
{{- define "fastfusion.s3Secret" -}}
{{- default (printf "%s-s3" (include "fastfusion.fullname" .)) .Values.storage.s3.existingSecret }}
{{- end }}

{{/* The images PVC. */}}
{{- define "fastfusion.storageClaim" -}}
{{- default (printf "%s-images" (include "fastfusion.fullname" .)) .Values.storage.pvc.existingClaim }}
{{- end }}
