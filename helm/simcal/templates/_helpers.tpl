{{/*
Names, labels and shared snippets for the simcal chart.
*/}}

{{/* Chart name, overridable with nameOverride. */}}
{{- define "simcal.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified name: release name + chart name, or fullnameOverride.
A release name that already contains the chart name is used as is.
*/}}
{{- define "simcal.fullname" -}}
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

{{/* chart label value: name-version */}}
{{- define "simcal.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Selector labels: stable across upgrades. */}}
{{- define "simcal.selectorLabels" -}}
app.kubernetes.io/name: {{ include "simcal.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Common labels of every resource. */}}
{{- define "simcal.labels" -}}
helm.sh/chart: {{ include "simcal.chart" . }}
{{ include "simcal.selectorLabels" . }}
{{- if .Chart.AppVersion }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: simcal
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
The DaskCluster name. The operator names the scheduler Service "<name>-scheduler" and
rejects cluster names longer than 53 characters.
*/}}
{{- define "simcal.clusterName" -}}
{{- $name := include "simcal.fullname" . }}
{{- if gt (len $name) 53 }}
{{- fail (printf "the DaskCluster name %q is %d characters long; the Dask operator allows at most 53. Use a shorter release name or set fullnameOverride." $name (len $name)) }}
{{- end }}
{{- $name }}
{{- end }}

{{/* Labels the operator puts on the scheduler pods and Service. */}}
{{- define "simcal.schedulerSelector" -}}
dask.org/cluster-name: {{ include "simcal.clusterName" . }}
dask.org/component: scheduler
{{- end }}

{{/* Labels the operator puts on the worker pods. */}}
{{- define "simcal.workerSelector" -}}
dask.org/cluster-name: {{ include "simcal.clusterName" . }}
dask.org/component: worker
{{- end }}

{{/* Labels of the driver pods (and selector of the driver Service). */}}
{{- define "simcal.driverSelector" -}}
{{ include "simcal.selectorLabels" . }}
app.kubernetes.io/component: driver
{{- end }}

{{/* In-cluster scheduler address (the operator's Service, port tcp-comm). */}}
{{- define "simcal.schedulerAddress" -}}
{{- $scheme := ternary "tls" "tcp" (include "simcal.tlsEnabled" . | eq "true") }}
{{- printf "%s://%s-scheduler.%s.svc.cluster.local:8786" $scheme (include "simcal.clusterName" .) .Release.Namespace }}
{{- end }}

{{- define "simcal.dashboardURL" -}}
{{- printf "http://%s-scheduler.%s.svc.cluster.local:8787" (include "simcal.clusterName" .) .Release.Namespace }}
{{- end }}

{{/* Container image reference: repository@digest or repository:tag (tag defaults to appVersion). */}}
{{- define "simcal.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (toString (default .Chart.AppVersion .Values.image.tag)) }}
{{- end }}
{{- end }}

{{- define "simcal.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "simcal.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "simcal.configMapName" -}}
{{- printf "%s-calibration" (include "simcal.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "simcal.pvcName" -}}
{{- if .Values.storage.persistence.existingClaim }}
{{- .Values.storage.persistence.existingClaim }}
{{- else }}
{{- printf "%s-data" (include "simcal.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "simcal.driverServiceName" -}}
{{- printf "%s-driver" (include "simcal.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Driver Job name: one per release revision, so an upgrade starts a new (resuming) driver. */}}
{{- define "simcal.driverJobName" -}}
{{- printf "%s-driver-%d" (include "simcal.fullname" . | trunc 48 | trimSuffix "-") (int .Release.Revision) }}
{{- end }}

{{/*
Worker counts.
  simcal.minWorkers: what the driver waits for (--min-workers) and helm test expects.
  simcal.autoscalerMinimum: the DaskAutoscaler's floor, never below simcal.minWorkers.
Both fail with a message naming the values when they are inconsistent.
*/}}
{{- define "simcal.minWorkers" -}}
{{- $w := .Values.workers }}
{{- $a := .Values.autoscaler }}
{{- if not (kindIs "invalid" $w.minReplicas) }}
{{- int $w.minReplicas }}
{{- else if and $a.enabled (not (kindIs "invalid" $a.minimum)) }}
{{- int $a.minimum }}
{{- else }}
{{- int $w.replicas }}
{{- end }}
{{- end }}

{{- define "simcal.autoscalerMinimum" -}}
{{- $min := int (include "simcal.minWorkers" .) }}
{{- if kindIs "invalid" .Values.autoscaler.minimum }}
{{- $min }}
{{- else }}
{{- int .Values.autoscaler.minimum }}
{{- end }}
{{- end }}

{{- define "simcal.checkWorkerCounts" -}}
{{- $min := int (include "simcal.minWorkers" .) }}
{{- if .Values.autoscaler.enabled }}
{{- $amin := int (include "simcal.autoscalerMinimum" .) }}
{{- if lt $amin $min }}
{{- fail (printf "autoscaler.minimum (%d) is below workers.minReplicas (%d): the driver waits for %d workers (--min-workers), so the autoscaler must never go below that. Raise autoscaler.minimum or lower workers.minReplicas." $amin $min $min) }}
{{- end }}
{{- if lt (int .Values.autoscaler.maximum) $amin }}
{{- fail (printf "autoscaler.maximum (%d) is below autoscaler.minimum (%d)." (int .Values.autoscaler.maximum) $amin) }}
{{- end }}
{{- else if gt $min (int .Values.workers.replicas) }}
{{- fail (printf "workers.minReplicas (%d) exceeds workers.replicas (%d): the driver would wait forever for workers that are never started." $min (int .Values.workers.replicas)) }}
{{- end }}
{{- end }}

{{/*
Fail early when the Dask operator's CRDs are not served, unless operator.skipCheck.
Offline renders pass the API with --api-versions kubernetes.dask.org/v1/DaskCluster.
*/}}
{{- define "simcal.checkOperator" -}}
{{- if and (not .Values.operator.skipCheck) (not (.Capabilities.APIVersions.Has "kubernetes.dask.org/v1/DaskCluster")) }}
{{- fail "\n\nsimcal needs the Dask Kubernetes operator, but this cluster does not serve kubernetes.dask.org/v1/DaskCluster.\nInstall the operator (and its CRDs) first:\n\n  helm install --repo https://helm.dask.org --create-namespace -n dask-operator --generate-name dask-kubernetes-operator\n\nthen install simcal again. To render offline, pass --api-versions kubernetes.dask.org/v1/DaskCluster\nto `helm template`, or set operator.skipCheck=true.\n" }}
{{- end }}
{{- end }}

{{/* Whether to render Prometheus Operator objects (monitoring.prometheusOperator: auto|always|never). */}}
{{- define "simcal.prometheusOperator" -}}
{{- $mode := .Values.monitoring.prometheusOperator }}
{{- if and .Values.monitoring.enabled (or (eq $mode "always") (and (eq $mode "auto") (.Capabilities.APIVersions.Has "monitoring.coreos.com/v1"))) }}
{{- "true" }}
{{- end }}
{{- end }}

{{/* Resource requirements with every quantity quoted (the CRD schemas type them as strings). */}}
{{- define "simcal.resources" -}}
{{- range $section, $items := . }}
{{- if $items }}
{{ $section }}:
{{- range $name, $quantity := $items }}
  {{ $name }}: {{ toString $quantity | quote }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/* prometheus.io/* annotations for Prometheus without the operator. Argument: dict root port. */}}
{{- define "simcal.scrapeAnnotations" -}}
{{- if and .root.Values.monitoring.enabled .root.Values.monitoring.scrapeAnnotations }}
prometheus.io/scrape: "true"
prometheus.io/port: {{ .port | quote }}
prometheus.io/path: /metrics
{{- end }}
{{- end }}

{{/* Writable emptyDir mounts under a read-only root filesystem. */}}
{{- define "simcal.writableMounts" -}}
- name: tmp
  mountPath: /tmp
- name: home
  mountPath: /home/simcal
{{- end }}

{{- define "simcal.writableVolumes" -}}
- name: tmp
  emptyDir: {}
- name: home
  emptyDir: {}
{{- end }}

{{/* Environment shared by every container. */}}
{{- define "simcal.commonEnv" -}}
- name: HOME
  value: /home/simcal
- name: PYTHONUNBUFFERED
  value: "1"
{{- end }}

{{/* Pod-level fields shared by all pods (service account, security, pull secrets). */}}
{{- define "simcal.podCommon" -}}
serviceAccountName: {{ include "simcal.serviceAccountName" . }}
automountServiceAccountToken: false
enableServiceLinks: false
{{- with .Values.podSecurityContext }}
securityContext:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* Scheduling fields. Argument: a values block with nodeSelector/tolerations/affinity/priorityClassName. */}}
{{- define "simcal.scheduling" -}}
{{- with .nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- end }}

{{/* HTTP probe on a named port. Argument: dict probe path port. */}}
{{- define "simcal.httpProbe" -}}
httpGet:
  path: {{ .path }}
  port: {{ .port | quote }}
initialDelaySeconds: {{ int .probe.initialDelaySeconds }}
periodSeconds: {{ int .probe.periodSeconds }}
timeoutSeconds: {{ int .probe.timeoutSeconds }}
failureThreshold: {{ int .probe.failureThreshold }}
{{- end }}

{{/*
Dask TLS (tls.enabled): every Dask connection is tls:// and both ends present a certificate
signed by the CA, from the existing Secret tls.existingSecret mounted at /etc/simcal/tls.
simcal.tlsEnabled is "true" or "" (fails without a Secret); simcal.tlsArgs are the
--tls-ca-file/--tls-cert/--tls-key flags `dask scheduler`, `dask worker` and `simcal run`
share; simcal.tlsEnv is the same as Dask config, for plain `distributed.Client` code.
*/}}
{{- define "simcal.tlsEnabled" -}}
{{- $tls := .Values.tls | default dict }}
{{- if $tls.enabled }}
{{- if not $tls.existingSecret }}
{{- fail "tls.enabled needs tls.existingSecret: the name of a Secret with the CA, certificate and key (keys tls.caKey, tls.certKey, tls.keyKey)." }}
{{- end }}
{{- "true" }}
{{- end }}
{{- end }}

{{- define "simcal.tlsArgs" -}}
- --tls-ca-file
- /etc/simcal/tls/ca.pem
- --tls-cert
- /etc/simcal/tls/tls.crt
- --tls-key
- /etc/simcal/tls/tls.key
{{- end }}

{{- define "simcal.tlsEnv" -}}
- name: DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION
  value: "true"
- name: DASK_DISTRIBUTED__COMM__TLS__CA_FILE
  value: /etc/simcal/tls/ca.pem
- name: DASK_DISTRIBUTED__COMM__TLS__CLIENT__CERT
  value: /etc/simcal/tls/tls.crt
- name: DASK_DISTRIBUTED__COMM__TLS__CLIENT__KEY
  value: /etc/simcal/tls/tls.key
{{- end }}

{{- define "simcal.tlsMount" -}}
- name: dask-tls
  mountPath: /etc/simcal/tls
  readOnly: true
{{- end }}

{{- define "simcal.tlsVolume" -}}
- name: dask-tls
  secret:
    secretName: {{ .Values.tls.existingSecret }}
    defaultMode: 0440
    items:
      - key: {{ .Values.tls.caKey }}
        path: ca.pem
      - key: {{ .Values.tls.certKey }}
        path: tls.crt
      - key: {{ .Values.tls.keyKey }}
        path: tls.key
{{- end }}

{{/* Quiet Dask on scheduler and workers (docs/performance.md): no worker profiler, 1 s
event-loop tick and memory monitor, a 2 s system monitor without disk counters (QUIET_DASK
in simcal/cluster.py). A variable of the same name in extraEnv comes later in the list and
wins. */}}
{{- define "simcal.quietDaskEnv" -}}
- name: DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED
  value: "False"
- name: DASK_DISTRIBUTED__ADMIN__TICK__INTERVAL
  value: 1s
- name: DASK_DISTRIBUTED__WORKER__MEMORY__MONITOR_INTERVAL
  value: 1s
- name: DASK_DISTRIBUTED__ADMIN__SYSTEM_MONITOR__INTERVAL
  value: 2s
- name: DASK_DISTRIBUTED__ADMIN__SYSTEM_MONITOR__DISK
  value: "False"
{{- end }}

{{/*
A Dask container (scheduler or worker): one skeleton for both. Takes a dict:
  root    the chart context
  name    container name
  values  the component's values (.Values.scheduler or .Values.workers): extraEnv,
          readinessProbe, livenessProbe, resources
  args    the command line (list)
  env     env entries after the common ones (list)
  ports   container ports (list; the probes use "http-dashboard")
  mounts  volume mounts after the writable ones (list); the TLS mount is added when enabled
*/}}
{{- define "simcal.daskContainer" -}}
{{- $root := .root -}}
{{- $v := .values -}}
- name: {{ .name }}
  image: {{ include "simcal.image" $root | quote }}
  imagePullPolicy: {{ $root.Values.image.pullPolicy }}
  args:
    {{- toYaml .args | nindent 4 }}
  env:
    {{- include "simcal.commonEnv" $root | nindent 4 }}
    {{- include "simcal.quietDaskEnv" $root | nindent 4 }}
    {{- with .env }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
    {{- with $v.extraEnv }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  ports:
    {{- toYaml .ports | nindent 4 }}
  readinessProbe:
    {{- include "simcal.httpProbe" (dict "path" "/health" "port" "http-dashboard" "probe" $v.readinessProbe) | nindent 4 }}
  livenessProbe:
    {{- include "simcal.httpProbe" (dict "path" "/health" "port" "http-dashboard" "probe" $v.livenessProbe) | nindent 4 }}
  {{- with $v.resources }}
  resources:
    {{- include "simcal.resources" . | trim | nindent 4 }}
  {{- end }}
  {{- with $root.Values.containerSecurityContext }}
  securityContext:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  volumeMounts:
    {{- include "simcal.writableMounts" $root | nindent 4 }}
    {{- with .mounts }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
    {{- if include "simcal.tlsEnabled" $root }}
    {{- include "simcal.tlsMount" $root | nindent 4 }}
    {{- end }}
{{- end }}
