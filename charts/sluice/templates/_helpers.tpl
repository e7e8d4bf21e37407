{{/* Name of the chart, or nameOverride. */}}
{{- define "sluice.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Prefix of every object name: fullnameOverride, or the release name (plus the chart name when the release name does not contain it). */}}
{{- define "sluice.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "sluice.operator.fullname" -}}{{ include "sluice.fullname" . }}-operator{{- end }}
{{- define "sluice.shim.fullname" -}}{{ include "sluice.fullname" . }}-shim{{- end }}
{{- define "sluice.tlsSecretName" -}}{{ include "sluice.fullname" . }}-operator-tls{{- end }}

{{/* Labels on every object. */}}
{{- define "sluice.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "sluice.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: sluice
{{- end }}

{{- define "sluice.operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "sluice.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "sluice.shim.selectorLabels" -}}
app.kubernetes.io/name: {{ include "sluice.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: shim
{{- end }}

{{- define "sluice.operator.serviceAccountName" -}}
{{- default (include "sluice.operator.fullname" .) .Values.operator.serviceAccount.name }}
{{- end }}

{{- define "sluice.shim.serviceAccountName" -}}
{{- default (include "sluice.shim.fullname" .) .Values.shim.serviceAccount.name }}
{{- end }}

{{/* image reference: (dict "root" $ "image" .Values.operator.image) */}}
{{- define "sluice.image" -}}
{{- $registry := .image.registry | default .root.Values.image.registry -}}
{{- $tag := .image.tag | default .root.Values.image.tag | default .root.Chart.AppVersion -}}
{{- if .image.digest -}}
{{- printf "%s%s@%s" (ternary "" (printf "%s/" $registry) (empty $registry)) .image.repository .image.digest -}}
{{- else -}}
{{- printf "%s%s:%s" (ternary "" (printf "%s/" $registry) (empty $registry)) .image.repository $tag -}}
{{- end -}}
{{- end }}

{{/* DNS name the shims dial. */}}
{{- define "sluice.operator.host" -}}
{{- printf "%s.%s.svc" (include "sluice.operator.fullname" .) .Release.Namespace -}}
{{- end }}
