{{/* The chart name, or nameOverride. */}}
{{- define "mloptimizer.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* "<release>-<chart>" cut to 63 characters, or fullnameOverride. */}}
{{- define "mloptimizer.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* A component's object name: "<fullname>-<component>", within 63 characters. */}}
{{- define "mloptimizer.componentName" -}}
{{- $full := include "mloptimizer.fullname" .root -}}
{{- printf "%s-%s" ($full | trunc (int (sub 62 (len .component))) | trimSuffix "-") .component -}}
{{- end -}}

{{- define "mloptimizer.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Selector labels of a component; call with (dict "root" $ "component" "operator"). */}}
{{- define "mloptimizer.selectorLabels" -}}
app.kubernetes.io/name: {{ include "mloptimizer.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* All labels of a component's objects. */}}
{{- define "mloptimizer.labels" -}}
{{ include "mloptimizer.selectorLabels" . }}
helm.sh/chart: {{ include "mloptimizer.chart" .root }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: mloptimizer
{{- end -}}

{{- define "mloptimizer.serviceAccountName" -}}
{{- if .Values.operator.serviceAccount.create -}}
{{- default (include "mloptimizer.fullname" .) .Values.operator.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.operator.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "mloptimizer.image" -}}
{{- printf "%s:%s" .image.repository (toString (default .root.Chart.AppVersion .image.tag)) -}}
{{- end -}}

{{- define "mloptimizer.rabbitmqName" -}}
{{- include "mloptimizer.componentName" (dict "root" . "component" "rabbitmq") -}}
{{- end -}}

{{- define "mloptimizer.postgresqlName" -}}
{{- include "mloptimizer.componentName" (dict "root" . "component" "postgresql") -}}
{{- end -}}

{{/* The Secret and key holding the AMQP URL. */}}
{{- define "mloptimizer.brokerSecretName" -}}
{{- if .Values.rabbitmq.enabled -}}
{{- include "mloptimizer.rabbitmqName" . -}}
{{- else -}}
{{- required "externalBroker.existingSecret is required when rabbitmq.enabled=false" .Values.externalBroker.existingSecret -}}
{{- end -}}
{{- end -}}

{{- define "mloptimizer.brokerSecretKey" -}}
{{- if .Values.rabbitmq.enabled -}}url{{- else -}}{{ .Values.externalBroker.key }}{{- end -}}
{{- end -}}

{{/* The Secret and key holding the PostgreSQL URL. */}}
{{- define "mloptimizer.databaseSecretName" -}}
{{- if .Values.postgresql.enabled -}}
{{- include "mloptimizer.postgresqlName" . -}}
{{- else -}}
{{- required "externalDatabase.existingSecret is required when postgresql.enabled=false" .Values.externalDatabase.existingSecret -}}
{{- end -}}
{{- end -}}

{{- define "mloptimizer.databaseSecretKey" -}}
{{- if .Values.postgresql.enabled -}}url{{- else -}}{{ .Values.externalDatabase.key }}{{- end -}}
{{- end -}}

{{/*
A generated credential kept across upgrades: the value already in the Secret when there is
one (lookup; empty under `helm template` and --dry-run), else a new random one.
Call with (dict "namespace" ns "name" secretName "key" key).
*/}}
{{- define "mloptimizer.persistentSecret" -}}
{{- $existing := lookup "v1" "Secret" .namespace .name -}}
{{- if and $existing $existing.data (hasKey $existing.data .key) -}}
{{- index $existing.data .key | b64dec -}}
{{- else -}}
{{- randAlphaNum 32 -}}
{{- end -}}
{{- end -}}

{{/* Hardened container securityContext, shared by every container. */}}
{{- define "mloptimizer.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: {{ .readOnly }}
runAsNonRoot: true
capabilities:
  drop:
    - ALL
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* The RBAC rules the operator needs in a namespace it watches. */}}
{{- define "mloptimizer.namespacedRules" -}}
# the searches: kopf lists/watches them and patches finalizers and annotations; the daemon
# and kopf patch their status
- apiGroups: ["mloptimizer.io"]
  resources: ["architecturesearches"]
  verbs: ["list", "watch", "patch"]
- apiGroups: ["mloptimizer.io"]
  resources: ["architecturesearches/status"]
  verbs: ["patch"]
# owner references with blockOwnerDeletion on the children
- apiGroups: ["mloptimizer.io"]
  resources: ["architecturesearches/finalizers"]
  verbs: ["update"]
# the trainer Deployment of each search, scaled with the trials in flight; read first, as
# it is acted on only when it names the search's uid as owner
- apiGroups: ["apps"]
  resources: ["deployments"]
  verbs: ["get", "create", "patch", "delete"]
- apiGroups: ["apps"]
  resources: ["deployments/scale"]
  verbs: ["patch"]
- apiGroups: ["apps"]
  resources: ["deployments/status"]
  verbs: ["get"]
# the <search>-broker Secret it writes, and the Secrets spec.storage/broker.secretRef name
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get", "create", "delete"]
# the claims a search mounts (dataset.imageFolder, output.pvc): read for their opt-in label
- apiGroups: [""]
  resources: ["persistentvolumeclaims"]
  verbs: ["get"]
# each search's trainer NetworkPolicy (DNS and the broker only), owned by the search
- apiGroups: ["networking.k8s.io"]
  resources: ["networkpolicies"]
  verbs: ["get", "create", "patch", "delete"]
# Events on the searches (kopf's and its own)
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
# each search's verify Job: after a final job to output.pvc, the operator's own image reads
# the claim (read-only) and reports each file's size and sha256 as its termination message
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["get", "create"]
# the verify Job's pod, for that termination message; the trainer pods, annotated with a
# deletion cost before a scale-down (idle ones go first); with GPU pools also a rented
# node's trainer pods, drained before its machine is destroyed
- apiGroups: [""]
  resources: ["pods"]
  verbs: {{ if .Values.vastai.enabled }}["list", "patch", "delete"]{{ else }}["list", "patch"]{{ end }}
{{- end -}}

{{/* rabbitmq.conf additions (conf.d/20-mloptimizer.conf); the management plugin is
enabled by the -management image. */}}
{{- define "mloptimizer.rabbitmqConf" -}}
# A trainer holds one unacked trial until it is trained: allow long trials.
consumer_timeout = {{ int64 .Values.rabbitmq.consumerTimeoutMs }}
# the guest user only from localhost; the operator and trainers use their own user
loopback_users.guest = true
listeners.tcp.default = 5672
management.tcp.port = 15672
# Largest message body the broker accepts: twice the message contract's 256 KiB body limit
# (mloptimizer.messages), so that no search can push a body the operator would read whole.
max_message_size = 524288
{{- end -}}

{{/* The egress rules (JSON) the operator adds to every search's trainer NetworkPolicy
(MLOPT_TRAINER_EGRESS): the bundled broker, networkPolicy.trainerEgress, and public
HTTP(S) for dataset downloads when networkPolicy.trainerDownloads. */}}
{{- define "mloptimizer.trainerEgress" -}}
{{- $rules := list -}}
{{- if .Values.rabbitmq.enabled -}}
{{- $broker := include "mloptimizer.selectorLabels" (dict "root" . "component" "rabbitmq") | fromYaml -}}
{{- $peer := dict "namespaceSelector" (dict "matchLabels" (dict "kubernetes.io/metadata.name" .Release.Namespace)) "podSelector" (dict "matchLabels" $broker) -}}
{{- $rules = append $rules (dict "to" (list $peer) "ports" (list (dict "protocol" "TCP" "port" 5672))) -}}
{{- end -}}
{{- range .Values.networkPolicy.trainerEgress -}}
{{- $rules = append $rules . -}}
{{- end -}}
{{- if .Values.networkPolicy.trainerDownloads -}}
{{- $public := dict "cidr" "0.0.0.0/0" "except" (list "10.0.0.0/8" "172.16.0.0/12" "192.168.0.0/16" "100.64.0.0/10" "127.0.0.0/8" "169.254.0.0/16") -}}
{{- $rules = append $rules (dict "to" (list (dict "ipBlock" $public)) "ports" (list (dict "protocol" "TCP" "port" 443) (dict "protocol" "TCP" "port" 80))) -}}
{{- end -}}
{{- toJson $rules -}}
{{- end -}}
