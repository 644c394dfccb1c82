#!/usr/bin/env bash
# The install_* functions take optional extra helm arguments; most calls here pass none.
# shellcheck disable=SC2119
# Deploys the whole fleet to the cluster of the current kubectl context: the four Redis
# stores with Sentinel, a 3-node RabbitMQ, ingress-nginx (a LoadBalancer Service), and
# the manifests of k8s/ with the images taken from your registry. Safe to run again: a
# new build gets a new tag, so the Deployments roll out to it.
#
#   IMAGE_REGISTRY=ghcr.io/acme BUILD_AND_PUSH=1 helm-config/deploy-charts-cluster.sh
#
# Environment: see deploy-common.sh; plus
#   IMAGE_REGISTRY   required: images are $IMAGE_REGISTRY/fleet-<service>:$IMAGE_TAG
#   IMAGE_TAG        default: with BUILD_AND_PUSH=1, the tag of this work tree (image_tag in
#                    deploy-common.sh: the short commit, plus -dirty-<hash> with local
#                    changes); without, the short commit (the images built for it elsewhere)
#   BUILD_AND_PUSH=1 build the three images with docker and push them first
#   SKIP_INGRESS=1   the cluster already runs ingress-nginx (IngressClass "nginx")
#   INGRESS_SERVICE_TYPE  type of the ingress-nginx Service (default LoadBalancer; NodePort
#                    on a cluster that has no load-balancer implementation)
#   INGRESS_ADDRESS_WAIT  seconds to wait at the end for the LoadBalancer's address (120)
set -euo pipefail

# shellcheck source-path=SCRIPTDIR source=deploy-common.sh
source "$(dirname "${BASH_SOURCE[0]}")/deploy-common.sh"

need kubectl helm

: "${IMAGE_REGISTRY:?set IMAGE_REGISTRY, e.g. ghcr.io/acme (images: \$IMAGE_REGISTRY/fleet-<service>:\$IMAGE_TAG)}"
if [ -z "${IMAGE_TAG:-}" ]; then
    if [ "${BUILD_AND_PUSH:-0}" = 1 ]; then
        IMAGE_TAG=$(image_tag)
    else
        IMAGE_TAG=$(git -C "$REPO_ROOT" rev-parse --short HEAD 2>/dev/null) ||
            die "not a git work tree: set IMAGE_TAG to the tag of the images in $IMAGE_REGISTRY"
        if [ -n "$(git -C "$REPO_ROOT" status --porcelain --untracked-files=all)" ]; then
            echo "note: the work tree has local changes; the images $IMAGE_REGISTRY/fleet-<service>:$IMAGE_TAG" \
                "are those of the commit (BUILD_AND_PUSH=1 builds and deploys the changes)" >&2
        fi
    fi
fi
INGRESS_SERVICE_TYPE=${INGRESS_SERVICE_TYPE:-LoadBalancer}
INGRESS_ADDRESS_WAIT=${INGRESS_ADDRESS_WAIT:-120}

log "context: $(kubectl config current-context), namespace: $NAMESPACE"

if [ "${BUILD_AND_PUSH:-0}" = 1 ]; then
    need docker
    for svc in "${SERVICES[@]}"; do
        image="$IMAGE_REGISTRY/fleet-$svc:$IMAGE_TAG"
        log "building and pushing $image"
        docker build --build-arg "SERVICE=$svc" -t "$image" -f "$REPO_ROOT/Dockerfile" "$REPO_ROOT"
        docker push "$image"
    done
fi

helm_repos
ensure_namespace
ensure_secret
if [ "${SKIP_INGRESS:-0}" != 1 ]; then
    install_ingress_nginx --set "controller.service.type=$INGRESS_SERVICE_TYPE"
fi
install_stores
install_rabbitmq

# The manifests name the placeholder images fleet/<service>:latest; apply a copy that names
# this build's images in the registry, so a new tag changes the pod templates.
rendered=$(mktemp -d)
trap 'rm -rf "$rendered"' EXIT
render_manifests "$rendered" "$IMAGE_REGISTRY/fleet-"
apply_manifests "$rendered"
apply_monitoring
wait_for_services

if [ "${SKIP_INGRESS:-0}" = 1 ]; then
    log "the fleet is up behind the cluster's ingress-nginx (IngressClass nginx)"
elif [ "$INGRESS_SERVICE_TYPE" = LoadBalancer ]; then
    # Cloud load balancers take a minute or two to get an address; bare-metal and kind
    # clusters without a load-balancer implementation (MetalLB, cloud-provider-kind) never
    # give one, so this waits a bounded time and then says what to do instead.
    log "waiting for the LoadBalancer address of ingress-nginx (up to $INGRESS_ADDRESS_WAIT s)"
    address=$(ingress_address)
    waited=0
    while [ -z "$address" ] && [ "$waited" -lt "$INGRESS_ADDRESS_WAIT" ]; do
        sleep 5
        waited=$((waited + 5))
        address=$(ingress_address)
    done
    if [ -n "$address" ]; then
        log "the fleet answers on http://$address/ (e.g. curl -X POST http://$address/stock/item/create/5)"
    else
        log "the fleet is up, but the Service ingress-nginx-controller has no LoadBalancer address"
        echo "    This cluster may have no load-balancer implementation (bare metal, kind): install"
        echo "    one (e.g. MetalLB), or run again with INGRESS_SERVICE_TYPE=NodePort, or use"
        echo "    kubectl -n ingress-nginx port-forward service/ingress-nginx-controller 8000:80"
    fi
    kubectl -n ingress-nginx get service ingress-nginx-controller
else
    log "the fleet answers on the node ports of:"
    kubectl -n ingress-nginx get service ingress-nginx-controller
    echo "    e.g. curl -X POST http://<node address>:<node port of 80>/stock/item/create/5"
fi
echo "    HorizontalPodAutoscalers need metrics-server in the cluster."
