{{/*
The chart name, overridable. Truncated at 63 characters because some Kubernetes name fields are
limited to this (by the DNS naming spec).
*/}}
{{- define "tokengate.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The full name of the release's resources: `<release>-<chart>`, or the release name alone when it
already contains the chart name. Truncated at 63 characters for the same DNS reason.
*/}}
{{- define "tokengate.fullname" -}}
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

{{/*
The namespace every resource goes into, written out on each resource so that rendered manifests
are explicit about it.
*/}}
{{- define "tokengate.namespace" -}}
{{- default .Release.Namespace .Values.namespaceOverride }}
{{- end }}

{{/*
`helm.sh/chart` label value: name and version, with `+` (not allowed in labels) replaced.
*/}}
{{- define "tokengate.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Selector labels: the stable subset (name, instance, component) that a Deployment's immutable
selector may use. Call with (dict "context" $ "component" "server").
*/}}
{{- define "tokengate.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tokengate.name" .context }}
app.kubernetes.io/instance: {{ .context.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/*
All standard labels, plus the user's commonLabels. Call with (dict "context" $ "component" "…").
*/}}
{{- define "tokengate.labels" -}}
{{ include "tokengate.selectorLabels" . }}
app.kubernetes.io/version: {{ include "tokengate.imageTag" .context | trunc 63 | trimSuffix "-" | quote }}
app.kubernetes.io/part-of: tokengate
app.kubernetes.io/managed-by: {{ .context.Release.Service }}
helm.sh/chart: {{ include "tokengate.chart" .context }}
{{- with .context.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
The ServiceAccount the pods use.
*/}}
{{- define "tokengate.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "tokengate.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
The image tag: the value, or the chart's appVersion (the tokengate release the chart was made for).
*/}}
{{- define "tokengate.imageTag" -}}
{{- default .Chart.AppVersion .Values.image.tag }}
{{- end }}

{{/*
The image reference from a repository plus a tag, a digest, or both (`repo:tag@digest`). An
explicit tag is kept next to a digest for readability; the digest alone decides what runs.
*/}}
{{- define "tokengate.image" -}}
{{- $image := .Values.image }}
{{- if not $image.repository }}
{{- fail "image.repository must be set" }}
{{- end }}
{{- if $image.digest }}
{{- if $image.tag }}
{{- printf "%s:%s@%s" $image.repository $image.tag $image.digest }}
{{- else }}
{{- printf "%s@%s" $image.repository $image.digest }}
{{- end }}
{{- else }}
{{- printf "%s:%s" $image.repository (include "tokengate.imageTag" .) }}
{{- end }}
{{- end }}

{{/*
Where the config file is mounted and its name inside the ConfigMap.
*/}}
{{- define "tokengate.configDir" -}}
/etc/tokengate
{{- end }}
{{- define "tokengate.configFile" -}}
tokengate.toml
{{- end }}

{{/*
A duration of the form "<n>s" or "<n>m" (the schema allows only these) in whole seconds, for the
arithmetic on terminationGracePeriodSeconds. Call with the string.
*/}}
{{- define "tokengate.durationSeconds" -}}
{{- if hasSuffix "m" . }}
{{- mul (trimSuffix "m" . | atoi) 60 }}
{{- else if hasSuffix "s" . }}
{{- trimSuffix "s" . | atoi }}
{{- else }}
{{- fail (printf "duration %q must be whole seconds or minutes, e.g. \"20s\" or \"1m\"" .) }}
{{- end }}
{{- end }}

{{/*
terminationGracePeriodSeconds: longer than the app's drain (shutdown_grace_period) plus the
preStop sleep that runs before SIGTERM, else the kubelet kills the pod mid-drain. Derived when
unset; an explicit value that is too short stops the render with the reason.
*/}}
{{- define "tokengate.terminationGracePeriodSeconds" -}}
{{- $drain := include "tokengate.durationSeconds" .Values.config.server.shutdown_grace_period | int }}
{{- $sleep := .Values.preStopSleepSeconds | int }}
{{- $needed := add $drain $sleep }}
{{- if kindIs "invalid" .Values.terminationGracePeriodSeconds }}
{{- add $needed 10 }}
{{- else }}
{{- $set := .Values.terminationGracePeriodSeconds | int }}
{{- if le $set $needed }}
{{- fail (printf "terminationGracePeriodSeconds (%d) must be greater than config.server.shutdown_grace_period (%ds) + preStopSleepSeconds (%ds) = %ds, or the pod is killed before it has drained; raise it or leave it empty to derive it" $set $drain $sleep $needed) }}
{{- end }}
{{- $set }}
{{- end }}
{{- end }}

{{/*
The Secret key holding a registered client's credential: `secretKey`, else the client_id for a
client secret and `<client_id>.pem` for a private_key_jwt key, when that is a valid key name.
Call with the client entry.
*/}}
{{- define "tokengate.secretKey" -}}
{{- $default := .client_id }}
{{- if eq (default "client_secret_basic" .auth_method) "private_key_jwt" }}
{{- $default = printf "%s.pem" .client_id }}
{{- end }}
{{- $key := default $default .secretKey }}
{{- if not (regexMatch "^[-._a-zA-Z0-9]+$" $key) }}
{{- fail (printf "client %q: %q is not a valid Secret key (letters, digits, '-', '_', '.'); set secretKey" .client_id $key) }}
{{- end }}
{{- $key }}
{{- end }}

{{/*
The Secret keys the registered clients need, as a JSON list: a client secret or, for
private_key_jwt, a PEM private key per client (clients with auth_method "none" have neither).
*/}}
{{- define "tokengate.secretKeys" -}}
{{- $keys := list }}
{{- range .Values.config.clients.registered }}
{{- if ne (default "client_secret_basic" .auth_method) "none" }}
{{- $keys = append $keys (include "tokengate.secretKey" .) }}
{{- end }}
{{- end }}
{{- toJson $keys }}
{{- end }}

{{/*
The name of the Secret holding the client secrets: the existing one, or the chart-rendered one.
Fails when clients need secrets and neither (or both) is configured.
*/}}
{{- define "tokengate.secretName" -}}
{{- $s := .Values.secret }}
{{- if and $s.existingSecret $s.create }}
{{- fail "set secret.existingSecret or secret.create, not both" }}
{{- end }}
{{- if $s.existingSecret }}
{{- $s.existingSecret }}
{{- else if $s.create }}
{{- include "tokengate.fullname" . }}
{{- else if include "tokengate.secretKeys" . | fromJsonArray }}
{{- fail "registered clients need secrets: set secret.existingSecret (production) or secret.create with secret.values (development)" }}
{{- end }}
{{- end }}

{{/*
The Secret keys holding private_key_jwt PEM keys, as a JSON list.
*/}}
{{- define "tokengate.privateKeyKeys" -}}
{{- $keys := list }}
{{- range .Values.config.clients.registered }}
{{- if eq (default "client_secret_basic" .auth_method) "private_key_jwt" }}
{{- $keys = append $keys (include "tokengate.secretKey" .) }}
{{- end }}
{{- end }}
{{- toJson $keys }}
{{- end }}

{{/*
TLS on the gRPC port: "" (off), or "true". Fails, with the reason, without a Secret. The
kubelet's native gRPC probes speak only plaintext, so with TLS tokengate also serves
grpc.health.v1 in plaintext on server.health_listen (contract §7), and the probes use that.
*/}}
{{- define "tokengate.tls" -}}
{{- $tls := .Values.tls }}
{{- if $tls.enabled }}
{{- if not $tls.existingSecret }}
{{- fail "tls.enabled needs tls.existingSecret: a kubernetes.io/tls Secret with tls.crt, tls.key and ca.crt (e.g. a cert-manager Certificate's secretName)" }}
{{- end }}
{{- true }}
{{- else if $tls.mtls }}
{{- fail "tls.mtls needs tls.enabled" }}
{{- end }}
{{- end }}

{{/*
mTLS on the gRPC port: "" (off) or "true": callers must present a certificate from the
Secret's ca.crt, and `config.callers` can name them by SAN.
*/}}
{{- define "tokengate.mtls" -}}
{{- if and (include "tokengate.tls" .) .Values.tls.mtls }}
{{- true }}
{{- end }}
{{- end }}

{{/*
The port the probes and the `helm test` pod check: the plaintext health port with TLS (they
speak neither TLS nor mTLS), else the gRPC port.
*/}}
{{- define "tokengate.probePort" -}}
{{- if include "tokengate.tls" . }}
{{- .Values.healthPort | int }}
{{- else }}
{{- .Values.containerPort | int }}
{{- end }}
{{- end }}

{{/*
The TLS Secret's files: the keys of a kubernetes.io/tls Secret (cert-manager's layout), as a
JSON list; ca.crt only with mTLS.
*/}}
{{- define "tokengate.tlsKeys" -}}
{{- $keys := list "tls.crt" "tls.key" }}
{{- if include "tokengate.mtls" . }}
{{- $keys = append $keys "ca.crt" }}
{{- end }}
{{- toJson $keys }}
{{- end }}

{{/*
The source of a CA bundle value (upstream.caBundle, cache.redis.caBundle) as a JSON object
{"kind": "configMap"|"secret", "name": ...}, or {} when none is set. Both set is refused.
Call with (dict "bundle" <the caBundle value> "path" "<its values path, for the message>").
*/}}
{{- define "tokengate.caBundleSource" -}}
{{- $ca := .bundle }}
{{- if and $ca.configMap $ca.secret }}
{{- fail (printf "set %s.configMap or %s.secret, not both" .path .path) }}
{{- else if $ca.configMap }}
{{- toJson (dict "kind" "configMap" "name" $ca.configMap) }}
{{- else if $ca.secret }}
{{- toJson (dict "kind" "secret" "name" $ca.secret) }}
{{- else }}
{{- toJson dict }}
{{- end }}
{{- end }}

{{/*
The upstream CA bundle's source (see tokengate.caBundleSource).
*/}}
{{- define "tokengate.upstreamCA" -}}
{{- include "tokengate.caBundleSource" (dict "bundle" .Values.upstream.caBundle "path" "upstream.caBundle") }}
{{- end }}

{{/*
The volume of one file from a ConfigMap or Secret (upstream-ca, cache-key, redis-password,
redis-ca): only that key, readable by the pod's group (fsGroup). Call with (dict "name" <volume
name> "source" {"kind": "configMap"|"secret", "name": ...} "key" <the key>).
*/}}
{{- define "tokengate.fileVolume" -}}
- name: {{ .name }}
  {{- if eq .source.kind "configMap" }}
  configMap:
    name: {{ .source.name }}
  {{- else }}
  secret:
    secretName: {{ .source.name }}
  {{- end }}
    items:
      - key: {{ .key }}
        path: {{ .key }}
    defaultMode: 0440
{{- end }}

{{/*
Where the upstream CA bundle is mounted: a directory of its own (no subPath), so a changed
ConfigMap or Secret reaches the file.
*/}}
{{- define "tokengate.upstreamCADir" -}}
/var/run/tokengate/upstream-ca
{{- end }}

{{/*
A duration of the form "<n>ms", "<n>s" or "<n>m" (the schema allows only these) in
milliseconds, to compare two of them. Call with the string.
*/}}
{{- define "tokengate.durationMillis" -}}
{{- if hasSuffix "ms" . }}
{{- trimSuffix "ms" . | atoi }}
{{- else if hasSuffix "s" . }}
{{- mul (trimSuffix "s" . | atoi) 1000 }}
{{- else if hasSuffix "m" . }}
{{- mul (trimSuffix "m" . | atoi) 60000 }}
{{- else }}
{{- fail (printf "duration %q must be in ms, s or m, e.g. \"50ms\", \"30s\" or \"5m\"" .) }}
{{- end }}
{{- end }}

{{/*
The durations' upper bounds, the binary's (src/config.rs, check_upper_bounds): a JSON schema
cannot compare the number inside "11m", so they are checked here, naming the key. A number of
more than twelve digits is past every bound and is refused before it could overflow the
arithmetic. Call with the context.
*/}}
{{- define "tokengate.checkDurationBounds" -}}
{{- $c := .Values.config }}
{{- $bounds := list
  (list "server.shutdown_grace_period" $c.server.shutdown_grace_period 3600000 "60m (1h)")
  (list "upstream.connect_timeout" $c.upstream.connect_timeout 600000 "10m")
  (list "upstream.request_timeout" $c.upstream.request_timeout 600000 "10m")
  (list "cache.redis.timeout" $c.cache.redis.timeout 600000 "10m")
  (list "cache.refresh_ahead" $c.cache.refresh_ahead 86400000 "1440m (24h)")
  (list "cache.min_remaining" $c.cache.min_remaining 86400000 "1440m (24h)")
  (list "cache.replay_window" $c.cache.replay_window 86400000 "1440m (24h)") }}
{{- range $bounds }}
{{- $value := index . 1 | toString }}
{{- if or (gt (len (regexFind "^[0-9]*" $value)) 12) (gt (include "tokengate.durationMillis" $value | int64) (index . 2 | int64)) }}
{{- fail (printf "config.%s (%s) must be at most %s: tokengate refuses a longer one" (index . 0) $value (index . 3)) }}
{{- end }}
{{- end }}
{{- end }}

{{/*
The redis cache backend: "" (memory) or "true". The Redis files (cache.redis.password and
cache.redis.caBundle) are refused without it, so a fleet that meant to share Redis cannot run
on per-pod memory caches unnoticed; the CA bundle is refused unless some URL is rediss://, as it
would imply TLS that a redis:// URL does not use.
*/}}
{{- define "tokengate.redis" -}}
{{- $files := .Values.cache.redis }}
{{- $ca := include "tokengate.caBundleSource" (dict "bundle" $files.caBundle "path" "cache.redis.caBundle") | fromJson }}
{{- if eq .Values.config.cache.backend "redis" }}
{{- if and $ca (not (regexMatch "(^|,)\\s*rediss://" .Values.config.cache.redis.url)) }}
{{- fail "cache.redis.caBundle is a trust root for TLS, but no URL in config.cache.redis.url is rediss://" }}
{{- end }}
{{- true }}
{{- else if or $files.password.existingSecret $ca }}
{{- fail "cache.redis.password and cache.redis.caBundle need config.cache.backend: redis; with the memory backend every pod keeps its own cache and Redis is not used" }}
{{- end }}
{{- end }}

{{/*
The cache key's Secret as a JSON object {"name": ..., "key": ..., "generate": bool}, or {}
when there is none (memory backend without cache.key.existingSecret: tokengate then makes a
random key per process). With redis and no existing Secret, the chart generates
`<fullname>-cache-key` (templates/secret-cache-key.yaml), one key for every pod.
*/}}
{{- define "tokengate.cacheKey" -}}
{{- $key := .Values.cache.key }}
{{- if $key.existingSecret }}
{{- toJson (dict "name" $key.existingSecret "key" $key.secretKey "generate" false) }}
{{- else if include "tokengate.redis" . }}
{{- toJson (dict "name" (printf "%s-cache-key" (include "tokengate.fullname" . | trunc 53 | trimSuffix "-")) "key" $key.secretKey "generate" true) }}
{{- else }}
{{- toJson dict }}
{{- end }}
{{- end }}

{{/*
Where the cache key, the Redis password and the Redis CA bundle are mounted: a directory each
(no subPath), like the upstream CA bundle.
*/}}
{{- define "tokengate.cacheKeyDir" -}}
/var/run/tokengate/cache-key
{{- end }}
{{- define "tokengate.redisPasswordDir" -}}
/var/run/tokengate/redis-password
{{- end }}
{{- define "tokengate.redisCADir" -}}
/var/run/tokengate/redis-ca
{{- end }}

{{/*
The Redis password's Secret as {"kind": "secret", "name": ...}, or {} without a password or
without the redis backend.
*/}}
{{- define "tokengate.redisPassword" -}}
{{- $name := .Values.cache.redis.password.existingSecret }}
{{- if and (include "tokengate.redis" .) $name }}
{{- toJson (dict "kind" "secret" "name" $name) }}
{{- else }}
{{- toJson dict }}
{{- end }}
{{- end }}

{{/*
The Redis CA bundle's source (see tokengate.caBundleSource); {} without the redis backend.
*/}}
{{- define "tokengate.redisCA" -}}
{{- if include "tokengate.redis" . }}
{{- include "tokengate.caBundleSource" (dict "bundle" .Values.cache.redis.caBundle "path" "cache.redis.caBundle") }}
{{- else }}
{{- toJson dict }}
{{- end }}
{{- end }}

{{/*
The TCP ports of the Redis URLs in config.cache.redis.url (comma-separated for Redis Cluster),
each URL's own port or 6379, as a JSON list without repeats. The NetworkPolicy opens egress to
them.
*/}}
{{- define "tokengate.redisPorts" -}}
{{- $ports := list }}
{{- range splitList "," .Values.config.cache.redis.url }}
{{- $url := urlParse (trim .) }}
{{- $port := regexFind ":[0-9]+$" $url.host | trimPrefix ":" | default "6379" }}
{{- $ports = append $ports ($port | int) }}
{{- end }}
{{- toJson ($ports | uniq) }}
{{- end }}

{{/*
The tokengate config as a dict, ready for toToml. The keys that name ports and files are the
chart's, so none of them can drift from the pod spec: `server.listen` comes from containerPort,
`server.health_listen` (with TLS) from healthPort, `server.metrics_listen` from metrics.port
(when metrics.enabled), `server.tls.*` from tls.mountPath,
`upstream.ca_file` from the upstream.caBundle mount, and `client_secret_file` (secret methods)
and `private_key_file` (private_key_jwt) from secret.mountPath. The assertion settings
(signing_alg, key_id, assertion_audience) and allowed_callers are passed through as set; the
schema admits the assertion settings only for private_key_jwt and client_secret_jwt, as the
binary does, and so is each client's `cache` switch. The broker's files are the chart's too:
`cache.key_file` (from the cache key's Secret), `cache.redis.password_file` and
`cache.redis.ca_file` (from cache.redis). The `[telemetry]` section is left out when it names
no otlp_endpoint, so tokengate's OTEL_* environment fallback stays in force. Duplicate client
ids, several default clients, duplicate caller names, SAN callers without mTLS,
allowed_callers naming no caller, a min_remaining above refresh_ahead and durations past the
binary's upper bounds are refused here, before the binary would refuse them.
*/}}
{{- define "tokengate.config" -}}
{{- include "tokengate.checkDurationBounds" . }}
{{- $config := deepCopy .Values.config }}
{{- $_ := set $config.server "listen" (printf "0.0.0.0:%d" (.Values.containerPort | int)) }}
{{- $mtls := include "tokengate.mtls" . }}
{{- if include "tokengate.tls" . }}
{{- $tlsDir := .Values.tls.mountPath | trimSuffix "/" }}
{{- $tls := dict "cert_file" (printf "%s/tls.crt" $tlsDir) "key_file" (printf "%s/tls.key" $tlsDir) }}
{{- if $mtls }}
{{- $_ := set $tls "client_ca_file" (printf "%s/ca.crt" $tlsDir) }}
{{- end }}
{{- $_ := set $config.server "tls" $tls }}
{{- end }}
{{- if include "tokengate.tls" . }}
{{- if eq (.Values.healthPort | int) (.Values.containerPort | int) }}
{{- fail (printf "healthPort (%d) must differ from containerPort: with TLS tokengate serves plaintext health on a port of its own" (.Values.healthPort | int)) }}
{{- end }}
{{- $_ := set $config.server "health_listen" (printf "0.0.0.0:%d" (.Values.healthPort | int)) }}
{{- end }}
{{- if .Values.metrics.enabled }}
{{- $metricsPort := .Values.metrics.port | int }}
{{- if eq $metricsPort (.Values.containerPort | int) }}
{{- fail (printf "metrics.port (%d) must differ from containerPort: metrics are served on a port of their own" $metricsPort) }}
{{- end }}
{{- if and (include "tokengate.tls" .) (eq $metricsPort (.Values.healthPort | int)) }}
{{- fail (printf "metrics.port (%d) must differ from healthPort: with TLS tokengate serves plaintext health there" $metricsPort) }}
{{- end }}
{{- if eq $metricsPort (.Values.service.port | int) }}
{{- fail (printf "metrics.port (%d) must differ from service.port: the Service carries both" $metricsPort) }}
{{- end }}
{{- $_ := set $config.server "metrics_listen" (printf "0.0.0.0:%d" $metricsPort) }}
{{- end }}
{{- if include "tokengate.upstreamCA" . | fromJson }}
{{- $_ := set $config.upstream "ca_file" (printf "%s/%s" (include "tokengate.upstreamCADir" .) .Values.upstream.caBundle.key) }}
{{- end }}
{{- $callers := dict }}
{{- range .Values.config.callers }}
{{- if hasKey $callers .name }}
{{- fail (printf "config.callers: %q is named twice" .name) }}
{{- end }}
{{- $_ := set $callers .name true }}
{{- if and .mtls_san (not $mtls) }}
{{- fail (printf "config.callers: %q is known by mtls_san, which needs mutual TLS (tls.enabled and tls.mtls)" .name) }}
{{- end }}
{{- end }}
{{- if not $config.callers }}
{{- $_ := unset $config "callers" }}
{{- end }}
{{- if not (dig "telemetry" "otlp_endpoint" "" $config) }}
{{- $_ := unset $config "telemetry" }}
{{- end }}
{{- $mount := .Values.secret.mountPath | trimSuffix "/" }}
{{- $clients := list }}
{{- $seen := dict }}
{{- $defaults := list }}
{{- range .Values.config.clients.registered }}
{{- if hasKey $seen .client_id }}
{{- fail (printf "config.clients.registered: client_id %q is registered twice" .client_id) }}
{{- end }}
{{- $_ := set $seen .client_id true }}
{{- $method := default "client_secret_basic" .auth_method }}
{{- $client := dict "client_id" .client_id "auth_method" $method "default" (default false .default) }}
{{- if .default }}
{{- $defaults = append $defaults .client_id }}
{{- end }}
{{- with .allowed_grants }}
{{- $_ := set $client "allowed_grants" . }}
{{- end }}
{{- if eq $method "private_key_jwt" }}
{{- $_ := set $client "private_key_file" (printf "%s/%s" $mount (include "tokengate.secretKey" .)) }}
{{- else if ne $method "none" }}
{{- $_ := set $client "client_secret_file" (printf "%s/%s" $mount (include "tokengate.secretKey" .)) }}
{{- end }}
{{- $entry := . }}
{{- range list "signing_alg" "key_id" "assertion_audience" "allowed_callers" "cache" }}
{{- if hasKey $entry . }}
{{- $_ := set $client . (get $entry .) }}
{{- end }}
{{- end }}
{{- range .allowed_callers }}
{{- if not (hasKey $callers .) }}
{{- fail (printf "client %q: allowed_callers names %q, which is not in config.callers" $entry.client_id .) }}
{{- end }}
{{- end }}
{{- $clients = append $clients $client }}
{{- end }}
{{- if gt (len $defaults) 1 }}
{{- fail (printf "config.clients.registered: more than one default client: %s" (join ", " $defaults)) }}
{{- end }}
{{- $_ := set $config.clients "registered" $clients }}
{{- $cache := $config.cache }}
{{- if gt (include "tokengate.durationMillis" $cache.min_remaining | int64) (include "tokengate.durationMillis" $cache.refresh_ahead | int64) }}
{{- fail (printf "config.cache.min_remaining (%s) must not exceed config.cache.refresh_ahead (%s): renewal must start before callers have to wait for it" $cache.min_remaining $cache.refresh_ahead) }}
{{- end }}
{{- with include "tokengate.cacheKey" . | fromJson }}
{{- $_ := set $cache "key_file" (printf "%s/%s" (include "tokengate.cacheKeyDir" $) .key) }}
{{- end }}
{{- if include "tokengate.redisPassword" . | fromJson }}
{{- $_ := set $cache.redis "password_file" (printf "%s/%s" (include "tokengate.redisPasswordDir" .) .Values.cache.redis.password.secretKey) }}
{{- end }}
{{- if include "tokengate.redisCA" . | fromJson }}
{{- $_ := set $cache.redis "ca_file" (printf "%s/%s" (include "tokengate.redisCADir" .) .Values.cache.redis.caBundle.key) }}
{{- end }}
{{- toJson $config }}
{{- end }}

{{/*
The config file as TOML. The JSON round trip makes every number a float, which TOML would write
as "1024.0" and tokengate would refuse for its integer keys, so those are made integers again.
*/}}
{{- define "tokengate.configToml" -}}
{{- $config := include "tokengate.config" . | fromJson }}
{{- range list "max_concurrent_calls" "max_queued_calls" }}
{{- if hasKey $config.server . }}
{{- $_ := set $config.server . (get $config.server . | int64) }}
{{- end }}
{{- end }}
{{- if hasKey $config.upstream "max_connections" }}
{{- $_ := set $config.upstream "max_connections" ($config.upstream.max_connections | int64) }}
{{- end }}
{{- if hasKey $config.cache "max_entries" }}
{{- $_ := set $config.cache "max_entries" ($config.cache.max_entries | int64) }}
{{- end }}
{{- toToml $config }}
{{- end }}

{{/*
The upstream's TCP port, from config.upstream.base_url: the explicit port, else 443 for https
and 80 for http. The NetworkPolicy opens egress to it.
*/}}
{{- define "tokengate.upstreamPort" -}}
{{- $url := urlParse .Values.config.upstream.base_url }}
{{- $port := regexFind ":[0-9]+$" $url.host | trimPrefix ":" }}
{{- if $port }}
{{- $port }}
{{- else if eq $url.scheme "http" }}
{{- 80 }}
{{- else }}
{{- 443 }}
{{- end }}
{{- end }}

{{/*
The label that lets a pod through the NetworkPolicy: `<fullname>-client`, shortened so the key
stays within the 63-character limit of a label name.
*/}}
{{- define "tokengate.clientLabel" -}}
{{- printf "%s-client" (include "tokengate.fullname" . | trunc 56 | trimSuffix "-") }}
{{- end }}

{{/*
Whether to render a Prometheus Operator object: "true" when its values' `enabled` is set and
the cluster serves monitoring.coreos.com/v1 or its `force` is set, else "". Call with
(dict "context" $ "values" .Values.serviceMonitor "key" "serviceMonitor"). Both objects read
the metrics port, so they are refused without metrics.enabled.
*/}}
{{- define "tokengate.monitoring" -}}
{{- if .values.enabled }}
{{- if not .context.Values.metrics.enabled }}
{{- fail (printf "%s.enabled needs metrics.enabled: tokengate serves no metrics without it" .key) }}
{{- end }}
{{- if or .values.force (.context.Capabilities.APIVersions.Has "monitoring.coreos.com/v1") }}
{{- true }}
{{- end }}
{{- end }}
{{- end }}

{{/*
The `[telemetry]` section's collector port, from config.telemetry.otlp_endpoint: the explicit
port, else 443 for https and 80 for http. The NetworkPolicy opens egress to it.
*/}}
{{- define "tokengate.telemetryPort" -}}
{{- $url := urlParse .Values.config.telemetry.otlp_endpoint }}
{{- $port := regexFind ":[0-9]+$" $url.host | trimPrefix ":" }}
{{- if $port }}
{{- $port }}
{{- else if eq $url.scheme "http" }}
{{- 80 }}
{{- else }}
{{- 443 }}
{{- end }}
{{- end }}

{{/*
An alert's labels: its severity plus prometheusRule.alertLabels. Call with
(dict "severity" ... "labels" ...).
*/}}
{{- define "tokengate.alertLabels" -}}
labels:
  {{- with .labels }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
  severity: {{ .severity | quote }}
{{- end }}

{{/*
An alert's runbook_url annotation: prometheusRule.runbookUrl plus the anchor of the alert's
section in docs/runbooks.md (its heading is the alert's name). Call with
(dict "alert" ... "runbook" ...).
*/}}
{{- define "tokengate.runbookUrl" -}}
runbook_url: {{ printf "%s#%s" .runbook (lower .alert) | quote }}
{{- end }}
