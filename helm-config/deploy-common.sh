# shellcheck shell=bash
# Shared by deploy-charts-minikube.sh and deploy-charts-cluster.sh (sourced, not run).
#
# Settings (environment):
#   NAMESPACE                    namespace of the fleet and its stores (default: fleet)
#   REDIS_PASSWORD, RABBITMQ_PASSWORD, RABBITMQ_ERLANG_COOKIE
#                                values for the Secret fleet-secrets; each one unset keeps
#                                the value already in the cluster, or gets a random one
#   BITNAMI_CHARTS               where the Bitnami charts come from
#                                (default: oci://registry-1.docker.io/bitnamicharts)
#   REDIS_CHART_VERSION, RABBITMQ_CHART_VERSION, INGRESS_NGINX_CHART_VERSION
#                                pinned chart versions (defaults below)
#   HELM_TIMEOUT                 how long each release may take to become ready (10m)

HELM_CONFIG_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck disable=SC2034 # used by the scripts that source this file
REPO_ROOT=$(cd "$HELM_CONFIG_DIR/.." && pwd)
NAMESPACE=${NAMESPACE:-fleet}
BITNAMI_CHARTS=${BITNAMI_CHARTS:-oci://registry-1.docker.io/bitnamicharts}
REDIS_CHART_VERSION=${REDIS_CHART_VERSION:-20.11.3}
RABBITMQ_CHART_VERSION=${RABBITMQ_CHART_VERSION:-16.0.14}
INGRESS_NGINX_CHART_VERSION=${INGRESS_NGINX_CHART_VERSION:-4.13.0}
HELM_TIMEOUT=${HELM_TIMEOUT:-10m}

# One Bitnami Redis release (3 nodes + 3 Sentinels) per store.
STORES=(order stock payment saga)
SERVICES=(stock payment order)

log() {
    printf '\n==> %s\n' "$*"
}

die() {
    echo "error: $*" >&2
    exit 1
}

need() {
    local tool
    for tool in "$@"; do
        command -v "$tool" >/dev/null 2>&1 || die "$tool is not installed (needed by $(basename "$0"))"
    done
}

# 48 hex characters: safe inside URLs and config files.
random_secret() {
    od -An -N24 -tx1 /dev/urandom | tr -d ' \n'
}

# The value of key $1 in the Secret fleet-secrets, or nothing.
existing_secret_value() {
    kubectl -n "$NAMESPACE" get secret fleet-secrets -o "jsonpath={.data.$1}" 2>/dev/null | base64 -d 2>/dev/null || true
}

ensure_namespace() {
    log "namespace $NAMESPACE"
    kubectl create namespace "$NAMESPACE" --dry-run=client -o yaml | kubectl apply -f -
}

# Creates or updates the Secret fleet-secrets (the template is
# k8s/secrets/fleet-secrets.template.yaml). Values: the environment, else what the cluster
# already holds (the stores keep their data under the old password), else random.
ensure_secret() {
    log "Secret fleet-secrets"
    local redis_password rabbitmq_password erlang_cookie value name
    redis_password=${REDIS_PASSWORD:-$(existing_secret_value redis-password)}
    rabbitmq_password=${RABBITMQ_PASSWORD:-$(existing_secret_value rabbitmq-password)}
    erlang_cookie=${RABBITMQ_ERLANG_COOKIE:-$(existing_secret_value rabbitmq-erlang-cookie)}
    redis_password=${redis_password:-$(random_secret)}
    rabbitmq_password=${rabbitmq_password:-$(random_secret)}
    erlang_cookie=${erlang_cookie:-$(random_secret)}
    for name in redis_password rabbitmq_password erlang_cookie; do
        value=${!name}
        case "$value" in
            CHANGE-ME*) die "$name still holds the template placeholder" ;;
            *[!A-Za-z0-9_.~-]*) die "$name may only use letters, digits and _.~- (it goes into URLs)" ;;
        esac
    done
    # Through a private file, so the values never show up in a process list.
    local env_file
    env_file=$(umask 077 && mktemp)
    printf 'redis-password=%s\nrabbitmq-password=%s\nrabbitmq-erlang-cookie=%s\n' \
        "$redis_password" "$rabbitmq_password" "$erlang_cookie" >"$env_file"
    kubectl -n "$NAMESPACE" create secret generic fleet-secrets \
        --from-env-file="$env_file" --dry-run=client -o yaml |
        kubectl -n "$NAMESPACE" apply -f - || {
        rm -f "$env_file"
        die "could not create the Secret fleet-secrets"
    }
    rm -f "$env_file"
}

helm_repos() {
    log "Helm repositories"
    # The Bitnami charts are pulled straight from their OCI registry (no `helm repo add`:
    # the classic index only lists recent versions, the pinned ones may be missing there).
    helm repo add ingress-nginx https://kubernetes.github.io/ingress-nginx --force-update
    helm repo update ingress-nginx
}

# install_stores [extra helm args...]
install_stores() {
    local store
    for store in "${STORES[@]}"; do
        log "Redis store $store (release ${store}-redis)"
        helm upgrade --install "${store}-redis" "$BITNAMI_CHARTS/redis" \
            --version "$REDIS_CHART_VERSION" \
            --namespace "$NAMESPACE" \
            --values "$HELM_CONFIG_DIR/redis-values.yaml" \
            --values "$HELM_CONFIG_DIR/redis-${store}-values.yaml" \
            "$@" \
            --wait --timeout "$HELM_TIMEOUT"
    done
}

# install_rabbitmq [extra helm args...]
install_rabbitmq() {
    log "RabbitMQ (release rabbitmq, 3 nodes)"
    helm upgrade --install rabbitmq "$BITNAMI_CHARTS/rabbitmq" \
        --version "$RABBITMQ_CHART_VERSION" \
        --namespace "$NAMESPACE" \
        --values "$HELM_CONFIG_DIR/rabbitmq-values.yaml" \
        "$@" \
        --wait --timeout "$HELM_TIMEOUT"
}

# install_ingress_nginx [extra helm args...]
install_ingress_nginx() {
    log "ingress-nginx (namespace ingress-nginx)"
    helm upgrade --install ingress-nginx ingress-nginx/ingress-nginx \
        --version "$INGRESS_NGINX_CHART_VERSION" \
        --namespace ingress-nginx --create-namespace \
        --values "$HELM_CONFIG_DIR/ingress-nginx-values.yaml" \
        "$@" \
        --wait --timeout "$HELM_TIMEOUT"
}

# apply_manifests <dir>: the services, their ConfigMaps, PDBs, HPAs and the Ingress.
# (k8s/secrets/ holds only a template and is not applied: `-f dir` does not recurse.)
apply_manifests() {
    log "manifests from $1"
    kubectl apply --namespace "$NAMESPACE" -f "$1"
}

wait_for_services() {
    local svc
    for svc in "${SERVICES[@]}"; do
        log "waiting for deployment/$svc"
        kubectl -n "$NAMESPACE" rollout status "deployment/$svc" --timeout=5m
    done
}
