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

{{/* The Lease the operator replicas elect a leader with. */}}
{{- define "sluice.leaseName" -}}
{{- .Values.operator.leaseName | default (include "sluice.operator.fullname" .) -}}
{{- end }}

{{/* The EndpointSlice the leader publishes itself in, as the shims' Service's only endpoint. */}}
{{- define "sluice.leaderSliceName" -}}
{{- printf "%s-leader" (include "sluice.operator.fullname" .) -}}
{{- end }}

{{/* The image of the uninstall hooks' Jobs: uninstall.kubectlImage, or the kubectl of the
cluster's minor version (the version Helm rendered against; EKS reports minors such as "31+"). */}}
{{- define "sluice.kubectlImage" -}}
{{- if .Values.uninstall.kubectlImage -}}
{{- .Values.uninstall.kubectlImage -}}
{{- else -}}
{{- printf "registry.k8s.io/kubectl:v%s.%s.0" (regexFind "[0-9]+" .Capabilities.KubeVersion.Major) (regexFind "[0-9]+" .Capabilities.KubeVersion.Minor) -}}
{{- end -}}
{{- end }}

{{/* A duration of the operator's flags ("500ms", "7s", "1.5s", "1m") in milliseconds. */}}
{{- define "sluice.millis" -}}
{{- $d := toString . -}}
{{- if hasSuffix "ms" $d -}}
{{- trimSuffix "ms" $d | float64 -}}
{{- else if hasSuffix "s" $d -}}
{{- mulf (trimSuffix "s" $d | float64) 1000 -}}
{{- else if hasSuffix "m" $d -}}
{{- mulf (trimSuffix "m" $d | float64) 60000 -}}
{{- else -}}
{{- fail (printf "%q is not a duration such as 500ms, 7s or 1m" $d) -}}
{{- end -}}
{{- end }}

{{/* Checks across values, which values.schema.json cannot express: each refusal names the
values and why the pods would not start with them. */}}
{{- define "sluice.validate" -}}
{{- $op := .Values.operator -}}
{{- if eq (int $op.grpcPort) (int $op.httpPort) -}}
{{- fail (printf "operator.grpcPort and operator.httpPort must differ (both are %d): the operator listens on both in one pod" (int $op.grpcPort)) -}}
{{- end -}}
{{- $le := $op.leaderElection -}}
{{- $lease := include "sluice.millis" $le.leaseDuration | float64 -}}
{{- $renew := include "sluice.millis" $le.renewDeadline | float64 -}}
{{- $retry := include "sluice.millis" $le.retryPeriod | float64 -}}
{{- if not (lt $renew $lease) -}}
{{- fail (printf "operator.leaderElection.renewDeadline (%s) must be shorter than leaseDuration (%s): the operator refuses to start otherwise" $le.renewDeadline $le.leaseDuration) -}}
{{- end -}}
{{- if not (lt $retry $renew) -}}
{{- fail (printf "operator.leaderElection.retryPeriod (%s) must be shorter than renewDeadline (%s): the operator refuses to start otherwise" $le.retryPeriod $le.renewDeadline) -}}
{{- end -}}
{{- if and .Values.tls.certManager.enabled .Values.tls.certManager.issuerRef (not .Values.tls.certManager.issuerRef.name) -}}
{{- fail "tls.certManager.issuerRef needs a name" -}}
{{- end -}}
{{- end }}

{{/* The shim's status file (in its /tmp emptyDir), written after each applied plan. */}}
{{- define "sluice.shim.statusFile" -}}/tmp/sluice-status.json{{- end }}

{{/* Where the kubelet sends the shim's liveness probe: empty (the pod's IP, which is the node's
on the host network) unless the endpoint listens on one address only. */}}
{{- define "sluice.shim.probeHost" -}}
{{- $host := .Values.shim.metricsHost | trimPrefix "[" | trimSuffix "]" -}}
{{- if and $host (not (has $host (list "0.0.0.0" "::"))) -}}
{{- $host -}}
{{- end -}}
{{- end }}

{{/* The pod template of an uninstall hook Job, up to its containers (which follow at the
indentation of "volumes"). */}}
{{- define "sluice.uninstall.jobPod" -}}
metadata:
  labels:
    app.kubernetes.io/name: {{ include "sluice.name" . }}
    app.kubernetes.io/instance: {{ .Release.Name }}
    app.kubernetes.io/component: uninstall
spec:
  serviceAccountName: {{ include "sluice.fullname" . }}-uninstall
  automountServiceAccountToken: true
  restartPolicy: Never
  {{- with .Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  securityContext:
    runAsNonRoot: true
    runAsUser: 65532
    runAsGroup: 65532
    seccompProfile:
      type: RuntimeDefault
  {{- with .Values.operator.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.operator.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  volumes:
    - name: tmp
      emptyDir:
        sizeLimit: 16Mi
{{- end }}

{{/* One kubectl container of an uninstall hook Job: (dict "root" $ "name" ... "args" (list ...)). */}}
{{- define "sluice.uninstall.kubectl" -}}
- name: {{ .name }}
  image: {{ include "sluice.kubectlImage" .root }}
  # Not image.pullPolicy, which is about Sluice's own images (Never for images loaded into kind).
  imagePullPolicy: IfNotPresent
  command: [kubectl]
  args:
    {{- toYaml .args | nindent 4 }}
  env:
    # kubectl's discovery cache.
    - name: HOME
      value: /tmp
  resources:
    requests:
      cpu: 10m
      memory: 32Mi
    limits:
      memory: 128Mi
  securityContext:
    allowPrivilegeEscalation: false
    readOnlyRootFilesystem: true
    privileged: false
    capabilities:
      drop: [ALL]
  volumeMounts:
    - name: tmp
      mountPath: /tmp
{{- end }}
