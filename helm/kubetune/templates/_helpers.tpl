{{/*
Names, labels, images and the operator's RBAC rules, shared by the templates.
*/}}

{{/* The chart name, or nameOverride. */}}
{{- define "kubetune.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The full name of every resource: fullnameOverride, else <release>-<name> (just <release> when
it already contains the name). 63 characters at most (DNS labels).
*/}}
{{- define "kubetune.fullname" -}}
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

{{/* <chart>-<version>, the helm.sh/chart label. */}}
{{- define "kubetune.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels that select the operator pod (never change them: Deployment selectors are immutable). */}}
{{- define "kubetune.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kubetune.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{/* Labels of every resource of the release. */}}
{{- define "kubetune.labels" -}}
helm.sh/chart: {{ include "kubetune.chart" . }}
{{ include "kubetune.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: kubetune
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* The operator's ServiceAccount. */}}
{{- define "kubetune.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "kubetune.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* repository:tag[@digest] of an image value ({repository, tag, digest}); tag defaults to appVersion. */}}
{{- define "kubetune.imageRef" -}}
{{- $tag := default .root.Chart.AppVersion .image.tag }}
{{- if .image.digest }}
{{- printf "%s:%s@%s" .image.repository $tag .image.digest }}
{{- else }}
{{- printf "%s:%s" .image.repository $tag }}
{{- end }}
{{- end }}

{{/* Where job pods POST progress: the operator's Service. */}}
{{- define "kubetune.progressBaseUrl" -}}
{{- printf "http://%s.%s.svc:8080/progress" (include "kubetune.fullname" .) .Release.Namespace }}
{{- end }}

{{/*
The operator's permissions in a namespace it watches: exactly the API calls its code makes
(tests/integration/test_operator_rbac.py runs the operator and fails on any difference).
In the all-namespaces mode they go in a ClusterRole, in watchNamespaces mode in a Role per
namespace.
*/}}
{{- define "kubetune.namespacedRules" -}}
# FineTuneJobs, EvalJobs and AdapterDeployments: kopf lists and watches them (the operator
# reads its cache only); status is written with merge patches on the status subresource,
# never spec.
- apiGroups: ["kubetune.io"]
  resources: ["finetunejobs", "evaljobs", "adapterdeployments"]
  verbs: ["list", "watch"]
# An AdapterDeployment is read directly before its missing children are recreated: the
# children of a deleted one must not come back from a stale cache.
- apiGroups: ["kubetune.io"]
  resources: ["adapterdeployments"]
  verbs: ["get"]
- apiGroups: ["kubetune.io"]
  resources: ["finetunejobs/status", "evaljobs/status", "adapterdeployments/status"]
  verbs: ["patch"]
# Children carry owner references with blockOwnerDeletion; where the
# OwnerReferencesPermissionEnforcement admission plugin is on (OpenShift), setting that needs
# update on the owner's finalizers. No finalizer is ever written.
- apiGroups: ["kubetune.io"]
  resources: ["finetunejobs/finalizers", "evaljobs/finalizers", "adapterdeployments/finalizers"]
  verbs: ["update"]
# Jobs: watched (cache), created, suspended or resumed (patch), deleted (failed image pull,
# new runId, TTL) and read by name to confirm one has vanished (JobMissing).
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# Pods of those Jobs and of AdapterDeployments: watched (cache) to explain a run (image pulls,
# scheduling, OOM, results) or a serving rollout (crash loops, readiness). The serving pods'
# agents are read over HTTP, not through the API.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list", "watch"]
# The RunConfig ConfigMap and the headless Service of multi-node runs: created, and deleted
# by the TTL (found by label) or a new runId. An AdapterDeployment's ConfigMap and Service:
# watched (cache, the serving ones only, by label), created, and replaced (update, a PUT)
# when their rendering changed or they were edited by hand; never deleted (garbage
# collection follows the owner reference).
- apiGroups: [""]
  resources: ["configmaps", "services"]
  verbs: ["list", "watch", "create", "update", "delete"]
# An AdapterDeployment's Deployment: watched (cache, by label), created, and replaced (update,
# a PUT) when the engine settings changed or it was scaled by hand; never deleted.
- apiGroups: ["apps"]
  resources: ["deployments"]
  verbs: ["list", "watch", "create", "update"]
# The per-job progress token Secret: created only. The operator derives each token from its
# own key (kubetune.progressKeyRules), so it never reads, lists, watches or deletes Secrets
# here; the Secret goes with its FineTuneJob through the owner reference.
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["create"]
# Events on transitions (core/v1 Events).
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
{{- end }}

{{/* The Secret with the operator's progress key, in the release namespace. */}}
{{- define "kubetune.progressKeySecret" -}}
{{- default (printf "%s-progress-key" (include "kubetune.fullname" .)) .Values.progress.keySecretName | trunc 253 }}
{{- end }}

{{/*
The operator's permissions in its own (the release) namespace: the key progress tokens are
derived from. The one Secret it reads, by name; create cannot be restricted by name
(resourceNames does not apply to create), so it may create any Secret in this namespace.
*/}}
{{- define "kubetune.progressKeyRules" -}}
- apiGroups: [""]
  resources: ["secrets"]
  resourceNames: [{{ include "kubetune.progressKeySecret" . | quote }}]
  verbs: ["get"]
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["create"]
{{- end }}

{{/* Labels added to the CRDs' own (app.kubernetes.io/name and part-of) when templated. */}}
{{- define "kubetune.crdLabels" -}}
helm.sh/chart: {{ include "kubetune.chart" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}
