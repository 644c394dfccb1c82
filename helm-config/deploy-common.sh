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
#   IMAGE_TAG                    tag of the service images (default: image_tag below)

HELM_CONFIG_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck disable=SC2034 # used by the scripts that source this file
REPO_ROOT=$(cd "$HELM_CONFIG_DIR/.." && pwd)
NAMESPACE=${NAMESPACE:-fleet}
BITNAMI_CHARTS=${BITNAMI_CHARTS:-oci://registry-1.docker.io/bitnamicharts}
REDIS_CHART_VERSION=${REDIS_CHART_VERSION:-20.11.3}
# RabbitMQ 3.13 in k8s, the major version compose runs (rabbitmq:3-management, the tag
# ../shared/compose-proof/run.sh provides) and the local fleet (the distribution's
# rabbitmq-server, 3.10 on Debian 12): chart 14.7.0
# is the last Bitnami rabbitmq chart whose appVersion is 3.13.x (3.13.7, image tag
# 3.13.7-debian-12-r2; bitnami/charts bitnami/rabbitmq/Chart.yaml, 2024-09-12). From 15.0.0
# (2024-09-20) the chart ships RabbitMQ 4.x (16.0.14: 4.1).
RABBITMQ_CHART_VERSION=${RABBITMQ_CHART_VERSION:-14.7.0}
# The newest patch of the 4.13 line: helm-chart-4.13.9 (2026-03-19, controller v1.13.9;
# kubernetes/ingress-nginx charts/ingress-nginx/changelog/helm-chart-4.13.9.md). 4.13.1 to
# 4.13.9 only move the controller image (values.yaml keys unchanged since 4.13.0), each
# release carrying the controller's later fixes. 4.14.x/4.15.x exist (4.15.1, same day).
INGRESS_NGINX_CHART_VERSION=${INGRESS_NGINX_CHART_VERSION:-4.13.9}
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

# The tag of the service images built from this work tree: the short commit, and when the
# tree has changes git does not ignore, "-dirty-" and a hash of those changes (tracked
# diff and untracked files). Every different tree gets its own tag, so applying the
# manifests with it changes the pod templates and rolls the Deployments out; a rebuilt
# image under a tag the cluster already runs (`:latest`) would not be picked up.
image_tag() {
    local commit changes
    if ! commit=$(git -C "$REPO_ROOT" rev-parse --short HEAD 2>/dev/null); then
        die "$REPO_ROOT is not a git work tree: set IMAGE_TAG"
    fi
    changes=$(git -C "$REPO_ROOT" status --porcelain --untracked-files=all)
    if [ -z "$changes" ]; then
        echo "$commit"
        return
    fi
    changes=$(
        cd "$REPO_ROOT" &&
            {
                git diff HEAD --binary
                git ls-files -z --others --exclude-standard | xargs -0 -r sha256sum --
            } | sha256sum | cut -c1-12
    )
    echo "$commit-dirty-$changes"
}

# render_manifests <dir> <image prefix>: copies of the manifests of k8s/ in <dir>, where
# each service's image (the placeholder fleet/<service>:latest in the files) is
# <image prefix><service>:$IMAGE_TAG.
render_manifests() {
    local out=$1 prefix=$2 manifest svc
    local edits=()
    for svc in "${SERVICES[@]}"; do
        edits+=(-e "s#^([[:space:]]*image:[[:space:]]*)fleet/$svc:latest[[:space:]]*\$#\\1$prefix$svc:$IMAGE_TAG#")
    done
    for manifest in "$REPO_ROOT"/k8s/*.yaml; do
        sed -E "${edits[@]}" "$manifest" >"$out/$(basename "$manifest")"
    done
    for svc in "${SERVICES[@]}"; do
        grep -qF "image: $prefix$svc:$IMAGE_TAG" "$out/$svc.yaml" ||
            die "k8s/$svc.yaml: no 'image: fleet/$svc:latest' line to point at $prefix$svc:$IMAGE_TAG"
    done
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
    # Kubernetes refuses to change the podManagementPolicy of a StatefulSet, so one created
    # with another policy (the chart's default, OrderedReady, before rabbitmq-values.yaml
    # set Parallel) is deleted without its pods (--cascade=orphan): the nodes keep running
    # on their volumes, and the StatefulSet helm creates again adopts them.
    # RabbitMQ cannot be downgraded in place: nodes that ran 4.x (the chart pinned before,
    # 16.0.14) keep 4.x feature flags on their volumes, and 3.13 refuses to start on them.
    local image
    image=$(kubectl -n "$NAMESPACE" get statefulset rabbitmq \
        -o 'jsonpath={.spec.template.spec.containers[0].image}' 2>/dev/null || true)
    case "$image" in
        *:[4-9].*)
            die "statefulset/rabbitmq runs $image; this chart runs RabbitMQ 3.13, which cannot start on a 4.x node's data: \
helm -n $NAMESPACE uninstall rabbitmq && kubectl -n $NAMESPACE delete pvc -l app.kubernetes.io/instance=rabbitmq (loses queued messages), then deploy again"
            ;;
    esac
    local wanted current
    wanted=$(sed -n 's/^podManagementPolicy:[[:space:]]*\([A-Za-z]*\).*/\1/p' "$HELM_CONFIG_DIR/rabbitmq-values.yaml")
    current=$(kubectl -n "$NAMESPACE" get statefulset rabbitmq \
        -o 'jsonpath={.spec.podManagementPolicy}' 2>/dev/null || true)
    if [ -n "$wanted" ] && [ -n "$current" ] && [ "$current" != "$wanted" ]; then
        log "statefulset/rabbitmq: podManagementPolicy $current -> $wanted (pods and volumes stay)"
        kubectl -n "$NAMESPACE" delete statefulset rabbitmq --cascade=orphan
    fi
    helm upgrade --install rabbitmq "$BITNAMI_CHARTS/rabbitmq" \
        --version "$RABBITMQ_CHART_VERSION" \
        --namespace "$NAMESPACE" \
        --values "$HELM_CONFIG_DIR/rabbitmq-values.yaml" \
        "$@" \
        --wait --timeout "$HELM_TIMEOUT"
}

# install_ingress_nginx [extra helm args...]
# Without `--wait`: helm's wait counts a LoadBalancer Service as ready only once it has an
# address, which a bare-metal or kind cluster without a load-balancer implementation never
# gives, so the release would time out although the controller runs. This waits for the
# controller pods instead (they serve the admission webhook that `kubectl apply` of the
# Ingresses needs); the address is reported at the end (report_ingress_address).
install_ingress_nginx() {
    log "ingress-nginx (namespace ingress-nginx)"
    helm upgrade --install ingress-nginx ingress-nginx/ingress-nginx \
        --version "$INGRESS_NGINX_CHART_VERSION" \
        --namespace ingress-nginx --create-namespace \
        --values "$HELM_CONFIG_DIR/ingress-nginx-values.yaml" \
        "$@" \
        --timeout "$HELM_TIMEOUT"
    kubectl -n ingress-nginx rollout status deployment/ingress-nginx-controller \
        --timeout "$HELM_TIMEOUT"
}

# The external address of the ingress-nginx LoadBalancer Service, or nothing yet.
ingress_address() {
    kubectl -n ingress-nginx get service ingress-nginx-controller \
        -o 'jsonpath={.status.loadBalancer.ingress[0].ip}{.status.loadBalancer.ingress[0].hostname}' \
        2>/dev/null || true
}

# apply_manifests <dir>: the services, their ConfigMaps, PDBs, HPAs and the Ingress.
# (k8s/secrets/ holds only a template and is not applied: `-f dir` does not recurse.)
apply_manifests() {
    log "manifests from $1"
    forget_applied_replicas "$1"
    kubectl apply --namespace "$NAMESPACE" -f "$1"
}

# forget_applied_replicas <dir>: the Deployments no longer set spec.replicas (their HPA
# owns the count). A client-side `kubectl apply` deletes a field that the last applied
# configuration had and the file lacks, so the first apply after that change would set
# replicas to the default 1 (one pod killed) until the HPA raises it again. For each
# Deployment whose last applied configuration still names replicas, that annotation is
# first set to the new file (`kubectl apply set-last-applied`, which changes nothing else),
# as the Kubernetes documentation on migrating Deployments to autoscaling advises.
forget_applied_replicas() {
    local svc last
    for svc in "${SERVICES[@]}"; do
        last=$(kubectl -n "$NAMESPACE" get deployment "$svc" \
            -o 'jsonpath={.metadata.annotations.kubectl\.kubernetes\.io/last-applied-configuration}' \
            2>/dev/null || true)
        case "$last" in
            *'"replicas"'*)
                log "deployment/$svc: replicas left to its HPA (last-applied configuration updated)"
                kubectl -n "$NAMESPACE" apply set-last-applied -f "$1/$svc.yaml"
                ;;
        esac
    done
}

# apply_monitoring: the ServiceMonitor of deploy/monitoring/k8s/, only where the Prometheus
# Operator's CRD exists (without it `kubectl apply` would fail on an unknown kind).
apply_monitoring() {
    if kubectl get crd servicemonitors.monitoring.coreos.com >/dev/null 2>&1; then
        log "ServiceMonitor fleet (Prometheus Operator found)"
        kubectl apply --namespace "$NAMESPACE" -f "$REPO_ROOT/deploy/monitoring/k8s/servicemonitor.yaml"
    else
        log "no Prometheus Operator (CRD servicemonitors.monitoring.coreos.com): ServiceMonitor skipped"
    fi
}

wait_for_services() {
    local svc
    for svc in "${SERVICES[@]}"; do
        log "waiting for deployment/$svc"
        kubectl -n "$NAMESPACE" rollout status "deployment/$svc" --timeout=5m
    done
}
