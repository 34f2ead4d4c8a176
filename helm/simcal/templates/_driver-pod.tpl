{{/*
The driver pod (metadata and spec of a pod template), rendered once: the chart's driver Job
uses it, and the ConfigMap <fullname>-driver-template holds it for `simcal submit`, which
wraps it in a Job of its own with the submitted calibration's ConfigMap, so submitted Jobs
carry this release's image, pull secrets, resources, TLS, storage and scheduling.
*/}}
{{- define "simcal.driverPodTemplate" -}}
{{- $d := .Values.driver }}
{{- $tls := include "simcal.tlsEnabled" . }}
{{- $grace := $d.terminationGracePeriodSeconds }}
{{- if kindIs "invalid" $grace }}
{{- $grace = add (int (dig "grace_period" 30 .Values.calibration)) 30 }}
{{- end }}
metadata:
  labels:
    {{- include "simcal.labels" . | nindent 4 }}
    app.kubernetes.io/component: driver
    {{- with $d.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- $annotations := merge (dict) ($d.podAnnotations | default dict) (include "simcal.scrapeAnnotations" (dict "root" . "port" 8000) | fromYaml) }}
  {{- with $annotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  restartPolicy: {{ $d.restartPolicy }}
  {{- include "simcal.podCommon" . | nindent 2 }}
  {{- with include "simcal.scheduling" $d }}
  {{- . | nindent 2 }}
  {{- end }}
  terminationGracePeriodSeconds: {{ int $grace }}
  containers:
    - name: driver
      image: {{ include "simcal.image" . | quote }}
      imagePullPolicy: {{ .Values.image.pullPolicy }}
      args:
        - simcal
        - run
        - --config
        - /etc/simcal/calibration.yaml
        - --scheduler
        - {{ include "simcal.schedulerAddress" . }}
        - --metrics-port
        - "8000"
        - --min-workers
        - {{ include "simcal.minWorkers" . | quote }}
        - --metrics-linger
        - {{ int $d.metricsLinger | quote }}
        - --connect-timeout
        - {{ int $d.connectTimeout | quote }}
        {{- if $tls }}
        {{- include "simcal.tlsArgs" . | nindent 8 }}
        {{- end }}
        {{- if not .Values.storage.existingSecret }}
        - --storage
        - sqlite:////data/simcal.db
        {{- end }}
        {{- range $d.extraArgs }}
        - {{ toString . | quote }}
        {{- end }}
      env:
        {{- include "simcal.commonEnv" . | nindent 8 }}
        # stored on every trial this driver runs (`simcal results`: host)
        - name: POD_NAME
          valueFrom:
            fieldRef:
              fieldPath: metadata.name
        {{- if .Values.storage.existingSecret }}
        - name: SIMCAL_STORAGE
          valueFrom:
            secretKeyRef:
              name: {{ .Values.storage.existingSecret }}
              key: {{ .Values.storage.existingSecretKey }}
        {{- end }}
        {{- with $d.extraEnv }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      ports:
        - name: metrics
          containerPort: 8000
          protocol: TCP
      readinessProbe:
        {{- $probe := dict "initialDelaySeconds" 0 "periodSeconds" 10 "timeoutSeconds" 5 "failureThreshold" 3 }}
        {{- include "simcal.httpProbe" (dict "path" "/metrics" "port" "metrics" "probe" $probe) | nindent 8 }}
      {{- with $d.resources }}
      resources:
        {{- include "simcal.resources" . | trim | nindent 8 }}
      {{- end }}
      {{- with .Values.containerSecurityContext }}
      securityContext:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      volumeMounts:
        - name: config
          mountPath: /etc/simcal
          readOnly: true
        {{- if not .Values.storage.existingSecret }}
        - name: data
          mountPath: /data
        {{- end }}
        {{- include "simcal.writableMounts" . | nindent 8 }}
    {{- with $d.extraVolumeMounts }}
    {{- toYaml . | nindent 8 }}
    {{- end }}
        {{- if $tls }}
        {{- include "simcal.tlsMount" . | nindent 8 }}
        {{- end }}
  volumes:
    - name: config
      configMap:
        name: {{ include "simcal.configMapName" . }}
    {{- if not .Values.storage.existingSecret }}
    - name: data
      persistentVolumeClaim:
        claimName: {{ include "simcal.pvcName" . }}
    {{- end }}
    {{- include "simcal.writableVolumes" . | nindent 4 }}
    {{- with $d.extraVolumes }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
    {{- if $tls }}
    {{- include "simcal.tlsVolume" . | nindent 4 }}
    {{- end }}
{{- end }}
