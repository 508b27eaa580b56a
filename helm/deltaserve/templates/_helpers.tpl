{{/* Chart name, truncated to the 63 characters a DNS label allows. */}}
{{- define "deltaserve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: "<release>-deltaserve" unless the release name already contains the chart name. */}}
{{- define "deltaserve.fullname" -}}
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

{{- define "deltaserve.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "deltaserve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "deltaserve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "deltaserve.labels" -}}
helm.sh/chart: {{ include "deltaserve.chart" . }}
{{ include "deltaserve.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "deltaserve.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "deltaserve.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Server image; the tag defaults to "<appVersion>-gpu" or "<appVersion>-cpu". */}}
{{- define "deltaserve.image" -}}
{{- $flavour := ternary "gpu" "cpu" .Values.gpu.enabled }}
{{- $tag := .Values.image.tag | default (printf "%s-%s" .Chart.AppVersion $flavour) }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}

{{/* Secret holding the API keys; empty when the API runs without keys. */}}
{{- define "deltaserve.authSecretName" -}}
{{- if .Values.auth.keyFileSecret }}
{{- else if .Values.auth.existingSecret }}
{{- .Values.auth.existingSecret }}
{{- else if .Values.auth.create }}
{{- printf "%s-auth" (include "deltaserve.fullname" .) }}
{{- end }}
{{- end }}

{{- define "deltaserve.storeClaimName" -}}
{{- .Values.store.existingClaim | default (printf "%s-store" (include "deltaserve.fullname" .)) }}
{{- end }}

{{/* Both API keys from the Secret, as container env entries. */}}
{{- define "deltaserve.authEnv" -}}
{{- $secret := include "deltaserve.authSecretName" . }}
{{- if $secret }}
- name: DELTASERVE_API_KEY
  valueFrom:
    secretKeyRef:
      name: {{ $secret }}
      key: {{ .Values.auth.apiKeySecretKey }}
- name: DELTASERVE_ADMIN_KEY
  valueFrom:
    secretKeyRef:
      name: {{ $secret }}
      key: {{ .Values.auth.adminKeySecretKey }}
{{- end }}
{{- end }}

{{/* The base model volume for baseModel.source (pvc | hostPath | initCopy). */}}
{{- define "deltaserve.baseVolume" -}}
{{- $base := .Values.baseModel }}
- name: base-model
{{- if eq $base.source "pvc" }}
  persistentVolumeClaim:
    claimName: {{ required "baseModel.pvc.claimName is required when baseModel.source=pvc" $base.pvc.claimName }}
    readOnly: true
{{- else if eq $base.source "hostPath" }}
  hostPath:
    path: {{ required "baseModel.hostPath.path is required when baseModel.source=hostPath" $base.hostPath.path }}
    type: {{ $base.hostPath.type }}
{{- else if eq $base.source "initCopy" }}
  emptyDir:
    sizeLimit: {{ $base.initCopy.sizeLimit }}
{{- else }}
{{- fail (printf "baseModel.source must be pvc, hostPath or initCopy, got %q" $base.source) }}
{{- end }}
{{- end }}

{{/* The container resources with gpu.count GPUs added when gpu.enabled. */}}
{{- define "deltaserve.resources" -}}
{{- $resources := deepCopy (.Values.resources | default dict) }}
{{- if .Values.gpu.enabled }}
{{- $name := .Values.gpu.resourceName }}
{{- $count := int .Values.gpu.count }}
{{- $_ := set $resources "requests" (merge (dict $name $count) (get $resources "requests" | default dict)) }}
{{- $_ := set $resources "limits" (merge (dict $name $count) (get $resources "limits" | default dict)) }}
{{- end }}
{{- toYaml $resources }}
{{- end }}

{{/* Whether the Prometheus Operator API is present (or declared with --api-versions). */}}
{{- define "deltaserve.hasPrometheusOperator" -}}
{{- if .Capabilities.APIVersions.Has "monitoring.coreos.com/v1" }}true{{ end }}
{{- end }}
