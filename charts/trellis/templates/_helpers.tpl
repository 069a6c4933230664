{{/*
Names. The components' names are fixed (ARCHITECTURE: the injector gives proxies
trellis-controller.<ns>.svc:8090 and trellis-identity.<ns>.svc:8080), so one release of the
chart per cluster.
*/}}

{{- define "trellis.issuerSecretName" -}}
{{- if .Values.identity.externalIssuer.enabled -}}
{{- .Values.identity.externalIssuer.secretName -}}
{{- else -}}
trellis-identity-issuer
{{- end -}}
{{- end -}}

{{- define "trellis.injectorTLSSecretName" -}}
{{- default "trellis-injector-tls" .Values.injector.tls.existingSecret -}}
{{- end -}}

{{- define "trellis.controllerAddr" -}}
trellis-controller.{{ .Release.Namespace }}.svc:8090
{{- end -}}

{{- define "trellis.identityAddr" -}}
trellis-identity.{{ .Release.Namespace }}.svc:8080
{{- end -}}

{{/* Where the trust anchors (ca.crt of the issuer Secret) are mounted. */}}
{{- define "trellis.trustAnchorsDir" -}}/var/run/trellis/trust-anchors{{- end -}}
{{- define "trellis.trustAnchorsFile" -}}/var/run/trellis/trust-anchors/ca.crt{{- end -}}

{{/* Where a component's projected token for identity is mounted (the proxy's path too). */}}
{{- define "trellis.identityTokenDir" -}}/var/run/secrets/trellis.dev/identity{{- end -}}
{{- define "trellis.identityTokenPath" -}}/var/run/secrets/trellis.dev/identity/token{{- end -}}

{{/* Labels on every object. */}}
{{- define "trellis.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/part-of: trellis
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* Selector labels of one component: (dict "root" $ "component" "controller"). */}}
{{- define "trellis.selectorLabels" -}}
app.kubernetes.io/name: trellis-{{ .component }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* Labels of one component's objects: the common labels and its selector labels. */}}
{{- define "trellis.componentLabels" -}}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/part-of: trellis
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
{{ include "trellis.selectorLabels" . }}
{{- end -}}

{{/* Image of a component: (dict "root" $ "image" .Values.controller.image). */}}
{{- define "trellis.image" -}}
{{- $tag := .image.tag | default (printf "v%s" .root.Chart.AppVersion) -}}
{{- printf "%s:%s" .image.repository $tag -}}
{{- end -}}

{{/* Log level of a component: its own, else the top-level one. */}}
{{- define "trellis.logLevel" -}}
{{- .component.logLevel | default .root.Values.logLevel -}}
{{- end -}}

{{/* Pod security context: the restricted Pod Security Standard. */}}
{{- define "trellis.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* Container security context: the restricted Pod Security Standard. */}}
{{- define "trellis.containerSecurityContext" -}}
allowPrivilegeEscalation: false
privileged: false
readOnlyRootFilesystem: true
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
capabilities:
  drop:
    - ALL
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* Probes on the admin port (9990). */}}
{{- define "trellis.probes" -}}
livenessProbe:
  httpGet:
    path: /live
    port: admin
  periodSeconds: 10
  timeoutSeconds: 2
  failureThreshold: 3
readinessProbe:
  httpGet:
    path: /ready
    port: admin
  periodSeconds: 5
  timeoutSeconds: 2
  failureThreshold: 3
{{- end -}}

{{/*
Scheduling of one component: (dict "root" $ "component" "controller" "values" .Values.controller).
*/}}
{{- define "trellis.scheduling" -}}
{{- $v := .values -}}
{{- if $v.affinity -}}
affinity:
  {{- toYaml $v.affinity | nindent 2 }}
{{- else if eq .root.Values.podAntiAffinity "preferred" -}}
affinity:
  podAntiAffinity:
    preferredDuringSchedulingIgnoredDuringExecution:
      - weight: 100
        podAffinityTerm:
          topologyKey: kubernetes.io/hostname
          labelSelector:
            matchLabels:
              {{- include "trellis.selectorLabels" . | nindent 14 }}
{{- else if eq .root.Values.podAntiAffinity "required" -}}
affinity:
  podAntiAffinity:
    requiredDuringSchedulingIgnoredDuringExecution:
      - topologyKey: kubernetes.io/hostname
        labelSelector:
          matchLabels:
            {{- include "trellis.selectorLabels" . | nindent 12 }}
{{- end }}
{{- with $v.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $v.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .root.Values.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- with .root.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* A PodDisruptionBudget when a component runs more than one replica. */}}
{{- define "trellis.pdb" -}}
{{- if gt (int .values.replicas) 1 }}
---
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata:
  name: trellis-{{ .component }}
  namespace: {{ .root.Release.Namespace }}
  labels:
    {{- include "trellis.componentLabels" . | nindent 4 }}
spec:
  maxUnavailable: 1
  selector:
    matchLabels:
      {{- include "trellis.selectorLabels" . | nindent 6 }}
{{- end }}
{{- end -}}

{{/* Pod labels and annotations of one component. */}}
{{- define "trellis.podMetadata" -}}
{{- $labels := merge (include "trellis.componentLabels" . | fromYaml) (.values.podLabels | default dict) -}}
labels:
  {{- toYaml $labels | nindent 2 }}
{{- with .values.podAnnotations }}
annotations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* Bytes of a memory quantity of the schema's form (digits and an optional suffix). */}}
{{- define "trellis.bytes" -}}
{{- $units := dict "" 1.0 "k" 1e3 "M" 1e6 "G" 1e9 "T" 1e12 "P" 1e15 "E" 1e18 "Ki" 1024.0 "Mi" 1048576.0 "Gi" 1073741824.0 "Ti" 1099511627776.0 "Pi" 1125899906842624.0 "Ei" 1152921504606846976.0 -}}
{{- $unit := regexFind "[A-Za-z]+$" . -}}
{{- mulf (trimSuffix $unit . | float64) (get $units $unit) -}}
{{- end -}}

{{/*
Rolling updates: a new pod is ready before an old one stops (no gap for the webhook and
discovery), except with required anti-affinity, where a surge pod has no node to go to when
there are as many nodes as replicas: then one old pod stops first.
*/}}
{{- define "trellis.strategy" -}}
type: RollingUpdate
rollingUpdate:
{{- if eq .root.Values.podAntiAffinity "required" }}
  maxSurge: 0
  maxUnavailable: 1
{{- else }}
  maxSurge: 1
  maxUnavailable: 0
{{- end }}
{{- end -}}
