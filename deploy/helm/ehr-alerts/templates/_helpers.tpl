{{- define "ehr-alerts.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "ehr-alerts.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "ehr-alerts.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "ehr-alerts.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "ehr-alerts.selector" -}}
app.kubernetes.io/name: {{ include "ehr-alerts.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "ehr-alerts.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "ehr-alerts.secretName" -}}
{{- default (printf "%s-secrets" (include "ehr-alerts.fullname" .)) .Values.existingSecret -}}
{{- end -}}

{{- define "ehr-alerts.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "ehr-alerts.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* host:port of Redis (bundled StatefulSet or external) */}}
{{- define "ehr-alerts.redisAddress" -}}
{{- if .Values.redis.enabled -}}
{{- printf "%s-redis:6379" (include "ehr-alerts.fullname" .) -}}
{{- else -}}
{{- printf "%s:%v" (required "redis.external.host is required when redis.enabled is false" .Values.redis.external.host) .Values.redis.external.port -}}
{{- end -}}
{{- end -}}

{{- define "ehr-alerts.redisPassword" -}}
{{- if .Values.redis.enabled -}}
{{- required "redis.password is required for the bundled Redis (or set existingSecret)" .Values.redis.password -}}
{{- else -}}
{{- .Values.redis.external.password -}}
{{- end -}}
{{- end -}}

{{- define "ehr-alerts.redisUrl" -}}
{{- $scheme := ternary "rediss" "redis" (and (not .Values.redis.enabled) .Values.redis.external.tls) -}}
{{- $password := include "ehr-alerts.redisPassword" . -}}
{{- if $password -}}
{{- printf "%s://:%s@%s/%v" $scheme (urlquery $password) (include "ehr-alerts.redisAddress" .) .Values.redis.database -}}
{{- else -}}
{{- printf "%s://%s/%v" $scheme (include "ehr-alerts.redisAddress" .) .Values.redis.database -}}
{{- end -}}
{{- end -}}

{{- define "ehr-alerts.podSecurity" -}}
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- end -}}

{{/* envFrom + checksums shared by the API and the workers */}}
{{- define "ehr-alerts.envFrom" -}}
envFrom:
  - configMapRef:
      name: {{ include "ehr-alerts.fullname" . }}-config
  - secretRef:
      name: {{ include "ehr-alerts.secretName" . }}
{{- end -}}

{{/* the volume source of the trust files: the chart's ConfigMap, or trust.existingConfigMap / existingSecret */}}
{{- define "ehr-alerts.trustSource" -}}
{{- if .Values.trust.existingSecret -}}
secret: {secretName: {{ .Values.trust.existingSecret }}}
{{- else if .Values.trust.existingConfigMap -}}
configMap: {name: {{ .Values.trust.existingConfigMap }}}
{{- else if or .Values.trust.jwks .Values.trust.caBundle -}}
configMap: {name: {{ include "ehr-alerts.fullname" . }}-trust}
{{- end -}}
{{- end -}}

{{/*
The API process shapes (EHR_ALERTS_API_ROUTES): one "api" Deployment serving every route, or with api.split.enabled
an "api" Deployment serving CDS Hooks, the review and the alert API (routes cds) and an "ingest" Deployment of the
same image serving only /fhir (routes ingest). A YAML list of {component, routes, replicas}.
*/}}
{{- define "ehr-alerts.apiShapes" -}}
{{- if .Values.api.split.enabled }}
- {component: api, routes: cds, replicas: {{ .Values.api.replicas }}}
- {component: ingest, routes: ingest, replicas: {{ .Values.api.split.ingest.replicas }}}
{{- else }}
- {component: api, routes: all, replicas: {{ .Values.api.replicas }}}
{{- end }}
{{- end -}}
