{{/* Names and labels. */}}
{{- define "zimage.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 40 | trimSuffix "-" -}}
{{- end -}}

{{- define "zimage.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "zimage.selectorLabels" -}}
app.kubernetes.io/name: {{ include "zimage.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "zimage.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "zimage.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: zimage-platform
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "zimage.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "zimage.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "zimage.opsServiceAccountName" -}}
{{- printf "%s-ops" (include "zimage.fullname" .) -}}
{{- end -}}

{{- define "zimage.tenantsSecret" -}}
{{- default (printf "%s-tenants" (include "zimage.fullname" .)) .Values.tenants.existingSecret -}}
{{- end -}}

{{/* An image reference: (dict "image" .Values.image "root" $). A digest wins over a tag. */}}
{{- define "zimage.imageRef" -}}
{{- if .image.digest -}}
{{- printf "%s@%s" .image.repository .image.digest -}}
{{- else -}}
{{- printf "%s:%s" .image.repository (default .root.Chart.AppVersion .image.tag) -}}
{{- end -}}
{{- end -}}

{{/* Where a tenantPolicy is mounted (from the ConfigMap). */}}
{{- define "zimage.policyPath" -}}/etc/zimage/policy/policy.yaml{{- end -}}

{{/* The platform config the pods run: .Values.platform, with tenancy.policy_file at the mounted
     tenantPolicy when one is given (else the content policy packaged with the platform). */}}
{{- define "zimage.platform" -}}
{{- $platform := deepCopy .Values.platform -}}
{{- if .Values.tenantPolicy.content -}}
{{- $tenancy := $platform.tenancy | default dict -}}
{{- $_ := set $tenancy "policy_file" (include "zimage.policyPath" .) -}}
{{- $_ := set $platform "tenancy" $tenancy -}}
{{- end -}}
{{- toYaml $platform -}}
{{- end -}}

{{/* The Serve config KubeRay deploys (serveConfigV2): the one builder, the platform config inline. */}}
{{- define "zimage.serveConfig" -}}
{{- $serve := .Values.platform.serve -}}
proxy_location: {{ .Values.ray.proxyLocation }}
http_options:
  host: {{ required "platform.serve.host" $serve.host | quote }}
  port: {{ required "platform.serve.port" $serve.port }}
applications:
  - name: {{ required "platform.serve.app_name" $serve.app_name }}
    route_prefix: {{ required "platform.serve.route_prefix" $serve.route_prefix }}
    import_path: zimage_platform.serve.builder:app_builder
    args:
      config:
        {{- include "zimage.platform" . | nindent 8 }}
{{- end -}}

{{/* Environment of a platform container: (dict "root" $ "secrets" (list "s3" "databaseUrl" ...)); "all"
     for Ray pods (any replica may land anywhere). Secret references only, never values; each
     container gets only the Secrets its job needs. */}}
{{- define "zimage.env" -}}
{{- $root := .root -}}
{{- $wanted := .secrets | default list -}}
{{- $all := has "all" $wanted -}}
- name: ZIMAGE_CONFIG
  value: /etc/zimage/config/platform.yaml
- name: RAY_USAGE_STATS_ENABLED
  value: "0"
- name: POD_NAME
  valueFrom: {fieldRef: {fieldPath: metadata.name}}
- name: POD_NAMESPACE
  valueFrom: {fieldRef: {fieldPath: metadata.namespace}}
- name: OTEL_RESOURCE_ATTRIBUTES
  value: k8s.pod.name=$(POD_NAME),k8s.namespace.name=$(POD_NAMESPACE)
{{- $s := $root.Values.secrets }}
{{- if and $s.s3.existingSecret (or $all (has "s3" $wanted)) }}
- name: AWS_ACCESS_KEY_ID
  valueFrom: {secretKeyRef: {name: {{ $s.s3.existingSecret }}, key: {{ $s.s3.accessKeyIdKey }}}}
- name: AWS_SECRET_ACCESS_KEY
  valueFrom: {secretKeyRef: {name: {{ $s.s3.existingSecret }}, key: {{ $s.s3.secretAccessKeyKey }}}}
{{- end }}
{{- range $name, $env := dict "databaseUrl" "ZIMAGE_DATABASE__URL" "databasePassword" "PGPASSWORD" "redisUrl" "ZIMAGE_TENANCY__REDIS_URL" "keyPepper" "ZIMAGE_TENANCY__KEY_PEPPER" "webhookSigningSecret" "ZIMAGE_WEBHOOKS__SIGNING_SECRET" "otlpHeaders" "ZIMAGE_TELEMETRY__OTLP_HEADERS" }}
{{- $ref := index $s $name }}
{{- if and $ref.existingSecret (or $all (has $name $wanted)) }}
- name: {{ $env }}
  valueFrom: {secretKeyRef: {name: {{ $ref.existingSecret }}, key: {{ $ref.key }}}}
{{- end }}
{{- end }}
{{- end -}}

{{- define "zimage.cacheMountPath" -}}/var/cache/zimage{{- end -}}

{{/* Volumes of Ray pods: engine cache, config, tenants, policy, scratch. */}}
{{- define "zimage.volumes" -}}
{{- $cache := .Values.engineCache -}}
- name: engine-cache
{{- if eq $cache.type "emptyDir" }}
  emptyDir: {sizeLimit: {{ $cache.sizeLimit }}}
{{- else if eq $cache.type "ephemeral" }}
  ephemeral:
    volumeClaimTemplate:
      spec:
        accessModes: [ReadWriteOnce]
        {{- with $cache.storageClassName }}
        storageClassName: {{ . }}
        {{- end }}
        resources: {requests: {storage: {{ $cache.size }}}}
{{- else }}
  persistentVolumeClaim: {claimName: {{ $cache.claimName }}}
{{- end }}
- name: config
  configMap: {name: {{ include "zimage.fullname" . }}-config}
- name: tenants
  secret: {secretName: {{ include "zimage.tenantsSecret" . }}, optional: true}
- name: tmp
  emptyDir: {}
- name: home
  emptyDir: {}
- name: shm
  emptyDir: {medium: Memory, sizeLimit: {{ .Values.ray.shmSize }}}
{{- end -}}

{{- define "zimage.volumeMounts" -}}
- {name: engine-cache, mountPath: {{ include "zimage.cacheMountPath" . }}}
- {name: config, mountPath: /etc/zimage/config, readOnly: true}
- {name: tenants, mountPath: {{ first .Values.platform.tenancy.dirs }}, readOnly: true}
{{- if .Values.tenantPolicy.content }}
- {name: config, mountPath: {{ include "zimage.policyPath" . }}, subPath: policy.yaml, readOnly: true}
{{- end }}
- {name: tmp, mountPath: /tmp}
- {name: home, mountPath: /home/zimage}
- {name: shm, mountPath: /dev/shm}
{{- end -}}

{{/* CPU quantity → millicores, for fit checks ("2", 2, "1500m"). */}}
{{- define "zimage.milliCpu" -}}
{{- $q := toString . -}}
{{- if hasSuffix "m" $q -}}{{ trimSuffix "m" $q | int }}{{- else -}}{{ mulf (float64 $q) 1000 | int }}{{- end -}}
{{- end -}}

{{/* A worker group's accelerator: (dict "group" $g "pool" $p) → "resource=count" or "". */}}
{{- define "zimage.accelerator" -}}
{{- $g := .group -}}{{- $p := .pool | default dict -}}
{{- if and $g.accelerator $g.accelerator.resource -}}
{{- printf "%s=%d" $g.accelerator.resource (int (default 1 $g.accelerator.count)) -}}
{{- else if $p.mig_profile -}}
{{- printf "nvidia.com/mig-%s=1" $p.mig_profile -}}
{{- else if gt (float64 (default 0 $p.num_gpus)) 0.0 -}}
{{- printf "nvidia.com/gpu=%d" (int (ceil (float64 $p.num_gpus))) -}}
{{- end -}}
{{- end -}}

{{/* Values the schema cannot check alone (they relate two parts of the values): fail at install. */}}
{{- define "zimage.validate" -}}
{{- $p := .Values.platform -}}
{{- $pools := $p.pools | default dict -}}
{{- if not $pools -}}
{{- fail "platform.pools is empty: install with a profile (-f values-dev.yaml, values-h800-mig.yaml or values-whole-gpu.yaml) or define pools" -}}
{{- end -}}
{{- $bound := dict -}}
{{- $accelerated := false -}}
{{- range $name, $g := .Values.workerGroups -}}
{{- if $g.pool -}}
{{- $pool := index $pools $g.pool -}}
{{- if not $pool -}}
{{- fail (printf "workerGroups.%s.pool: no pool %q in platform.pools (pools: %s)" $name $g.pool (keys $pools | sortAlpha | join ", ")) -}}
{{- end -}}
{{- if and $g.migProfile (ne $g.migProfile (toString $pool.mig_profile)) -}}
{{- fail (printf "workerGroups.%s.migProfile %q does not match pool %q's mig_profile %q" $name $g.migProfile $g.pool (toString $pool.mig_profile)) -}}
{{- end -}}
{{- $cpus := mulf (float64 (ternary $pool.num_cpus 1.0 (hasKey $pool "num_cpus"))) 1000 | int -}}
{{- if lt (include "zimage.milliCpu" $g.resources.limits.cpu | int) $cpus -}}
{{- fail (printf "workerGroups.%s: its CPU limit %v is below one replica of pool %q (num_cpus %v)" $name $g.resources.limits.cpu $g.pool $pool.num_cpus) -}}
{{- end -}}
{{- $_ := set $bound $g.pool true -}}
{{- end -}}
{{- if include "zimage.accelerator" (dict "group" $g "pool" (index $pools (default "" $g.pool))) -}}
{{- $accelerated = true -}}
{{- end -}}
{{- if gt (int (default 0 $g.minReplicas)) (int $g.maxReplicas) -}}
{{- fail (printf "workerGroups.%s: minReplicas exceeds maxReplicas" $name) -}}
{{- end -}}
{{- end -}}
{{- range $name, $pool := $pools -}}
{{- if and $pool.ray_resources (not (hasKey $bound $name)) -}}
{{- fail (printf "pool %q needs Ray resources %v but no worker group serves it (set workerGroups.<name>.pool: %s)" $name $pool.ray_resources $name) -}}
{{- end -}}
{{- if and $pool.mig_profile (not (gt (float64 (default 0 $pool.num_gpus)) 0.0)) -}}
{{- fail (printf "pool %q runs on MIG slices (%s) but has num_gpus 0: its engines would run on the CPU; set num_gpus: 1" $name $pool.mig_profile) -}}
{{- end -}}
{{- if and (gt (float64 (default 0 $pool.num_gpus)) 0.0) (not $accelerated) -}}
{{- fail (printf "pool %q needs GPUs but no worker group has an accelerator" $name) -}}
{{- end -}}
{{- end -}}
{{- $s := .Values.secrets -}}
{{- if not $s.keyPepper.existingSecret -}}
{{- fail "secrets.keyPepper.existingSecret is required: every replica must hash API keys with the same pepper" -}}
{{- end -}}
{{- if not $s.webhookSigningSecret.existingSecret -}}
{{- fail "secrets.webhookSigningSecret.existingSecret is required: every replica must sign webhooks with the same secret" -}}
{{- end -}}
{{- $db := ($p.database | default dict).url -}}
{{- if and $db $s.databaseUrl.existingSecret -}}
{{- fail "set platform.database.url or secrets.databaseUrl, not both (the inline URL would win)" -}}
{{- end -}}
{{- if not (or $db $s.databaseUrl.existingSecret) -}}
{{- fail "a database is required (PostgreSQL shared by all pods): secrets.databaseUrl, or platform.database.url with secrets.databasePassword" -}}
{{- end -}}
{{- $tenancy := $p.tenancy | default dict -}}
{{- if and $tenancy.redis_url $s.redisUrl.existingSecret -}}
{{- fail "set platform.tenancy.redis_url or secrets.redisUrl, not both (the inline URL would win)" -}}
{{- end -}}
{{- if and (eq (toString $tenancy.rate_limit_backend) "redis") (not (or $tenancy.redis_url $s.redisUrl.existingSecret)) -}}
{{- fail "platform.tenancy.rate_limit_backend is redis: set platform.tenancy.redis_url or secrets.redisUrl" -}}
{{- end -}}
{{- if and (gt (int (default 1 ($p.serve | default dict).ingress_replicas)) 1) (ne (toString $tenancy.rate_limit_backend) "redis") -}}
{{- fail "platform.serve.ingress_replicas > 1 needs platform.tenancy.rate_limit_backend: redis (limits are shared through Redis)" -}}
{{- end -}}
{{- range $key := list "data_dir" "engine_build_dir" -}}
{{- if not (hasPrefix (printf "%s/" (include "zimage.cacheMountPath" $)) (toString (index $p.paths $key))) -}}
{{- fail (printf "platform.paths.%s must be under the engine cache volume %s" $key (include "zimage.cacheMountPath" $)) -}}
{{- end -}}
{{- end -}}
{{- if and .Values.engineBuild.enabled (not .Values.engines.s3Uri) -}}
{{- fail "engineBuild.enabled needs engines.s3Uri (where verified engines are published)" -}}
{{- end -}}
{{- end -}}

{{/* A Job's pod: (dict "root" $ "name" "..." "image" .Values.image "command" (list ...) "resources" {...}
     "accelerator" "nvidia.com/gpu=1" "ops" false "cache" false "secrets" (list "s3") "scheduling" {nodeSelector, tolerations, affinity}). */}}
{{- define "zimage.jobPod" -}}
{{- $root := .root -}}
{{- $s := .scheduling | default dict -}}
metadata:
  labels:
    {{- include "zimage.labels" $root | nindent 4 }}
    app.kubernetes.io/component: {{ .name }}
spec:
  restartPolicy: Never
  serviceAccountName: {{ ternary (include "zimage.opsServiceAccountName" $root) (include "zimage.serviceAccountName" $root) (default false .ops) }}
  automountServiceAccountToken: {{ default false .ops }}
  securityContext:
    {{- toYaml $root.Values.podSecurityContext | nindent 4 }}
  {{- with $root.Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $s.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $s.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $s.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  containers:
    - name: {{ .name }}
      image: {{ include "zimage.imageRef" (dict "image" .image "root" $root) }}
      imagePullPolicy: {{ .image.pullPolicy }}
      command:
        {{- toYaml .command | nindent 8 }}
      env:
        {{- include "zimage.env" (dict "root" $root "secrets" .secrets) | nindent 8 }}
      resources:
        requests:
          {{- toYaml .resources.requests | nindent 10 }}
        limits:
          {{- toYaml .resources.limits | nindent 10 }}
          {{- with .accelerator }}
          {{ first (splitList "=" .) }}: {{ last (splitList "=" .) | int }}
          {{- end }}
      securityContext:
        {{- toYaml $root.Values.securityContext | nindent 8 }}
      volumeMounts:
        - {name: config, mountPath: /etc/zimage/config, readOnly: true}
        - {name: tmp, mountPath: /tmp}
        - {name: home, mountPath: /home/zimage}
        {{- if .cache }}
        - {name: engine-cache, mountPath: {{ include "zimage.cacheMountPath" $root }}}
        {{- end }}
  volumes:
    - name: config
      configMap: {name: {{ include "zimage.fullname" $root }}-config}
    - name: tmp
      emptyDir: {}
    - name: home
      emptyDir: {}
    {{- if .cache }}
    - name: engine-cache
      emptyDir: {sizeLimit: {{ $root.Values.engineCache.sizeLimit }}}
    {{- end }}
{{- end -}}
