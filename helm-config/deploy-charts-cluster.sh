#!/usr/bin/env bash
# The install_* functions take optional extra helm arguments; none are needed here.
# shellcheck disable=SC2119
# Deploys the whole fleet to the cluster of the current kubectl context: the four Redis
# stores with Sentinel, a 3-node RabbitMQ, ingress-nginx (a LoadBalancer Service), and
# the manifests of k8s/ with the images taken from your registry. Safe to run again.
#
#   IMAGE_REGISTRY=ghcr.io/acme IMAGE_TAG=v1 helm-config/deploy-charts-cluster.sh
#
# Environment: see deploy-common.sh; plus
#   IMAGE_REGISTRY   required: images are $IMAGE_REGISTRY/fleet-<service>:$IMAGE_TAG
#   IMAGE_TAG        default: the short git commit of the work tree, else "latest"
#   BUILD_AND_PUSH=1 build the three images with docker and push them first
#   SKIP_INGRESS=1   the cluster already runs ingress-nginx (IngressClass "nginx")
set -euo pipefail

# shellcheck source-path=SCRIPTDIR source=deploy-common.sh
source "$(dirname "${BASH_SOURCE[0]}")/deploy-common.sh"

need kubectl helm

: "${IMAGE_REGISTRY:?set IMAGE_REGISTRY, e.g. ghcr.io/acme (images: \$IMAGE_REGISTRY/fleet-<service>:\$IMAGE_TAG)}"
IMAGE_TAG=${IMAGE_TAG:-$(git -C "$REPO_ROOT" rev-parse --short HEAD 2>/dev/null || echo latest)}

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
    install_ingress_nginx
fi
install_stores
install_rabbitmq

# The manifests name the images fleet/<service>:latest (what minikube builds); render a
# copy that names the registry's images, then apply it like k8s/.
rendered=$(mktemp -d)
trap 'rm -rf "$rendered"' EXIT
for manifest in "$REPO_ROOT"/k8s/*.yaml; do
    sed -E "s#image: fleet/(stock|payment|order):latest#image: ${IMAGE_REGISTRY}/fleet-\\1:${IMAGE_TAG}#" \
        "$manifest" >"$rendered/$(basename "$manifest")"
done
apply_manifests "$rendered"
wait_for_services

log "the fleet is up; its address is the EXTERNAL-IP of:"
kubectl -n ingress-nginx get service ingress-nginx-controller
echo "    e.g. curl -X POST http://<EXTERNAL-IP>/stock/item/create/5"
echo "    HorizontalPodAutoscalers need metrics-server in the cluster."
