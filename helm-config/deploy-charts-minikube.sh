#!/usr/bin/env bash
# Deploys the whole fleet to minikube: the four Redis stores with Sentinel, a 3-node
# RabbitMQ, ingress-nginx (NodePort 30080), the service images built inside minikube, and
# the manifests of k8s/. Safe to run again (everything is `helm upgrade --install` and
# `kubectl apply`); the images are tagged by commit (image_tag in deploy-common.sh), so a
# run after a change builds a new tag and the Deployments roll out to it.
#
#   helm-config/deploy-charts-minikube.sh
#
# Environment: see deploy-common.sh; plus
#   MINIKUBE_CPUS / MINIKUBE_MEMORY  size of a minikube started here (default 4 / 8g)
#   SKIP_BUILD=1                     use the fleet/<service>:$IMAGE_TAG images already in
#                                    minikube (built by an earlier run from the same tree)
set -euo pipefail

# shellcheck source-path=SCRIPTDIR source=deploy-common.sh
source "$(dirname "${BASH_SOURCE[0]}")/deploy-common.sh"

need minikube kubectl helm

if ! minikube status >/dev/null 2>&1; then
    log "starting minikube"
    minikube start --cpus "${MINIKUBE_CPUS:-4}" --memory "${MINIKUBE_MEMORY:-8g}"
fi
kubectl config use-context minikube >/dev/null
# The HorizontalPodAutoscalers need CPU metrics.
minikube addons enable metrics-server

IMAGE_TAG=${IMAGE_TAG:-$(image_tag)}
if [ "${SKIP_BUILD:-0}" != 1 ]; then
    for svc in "${SERVICES[@]}"; do
        log "building fleet/$svc:$IMAGE_TAG inside minikube"
        minikube image build -t "fleet/$svc:$IMAGE_TAG" \
            --build-opt "build-arg=SERVICE=$svc" "$REPO_ROOT"
    done
else
    images=$(minikube image ls)
    for svc in "${SERVICES[@]}"; do
        grep -Fxq -e "fleet/$svc:$IMAGE_TAG" -e "docker.io/fleet/$svc:$IMAGE_TAG" \
            -e "localhost/fleet/$svc:$IMAGE_TAG" <<<"$images" ||
            die "SKIP_BUILD=1, but minikube has no image fleet/$svc:$IMAGE_TAG (the tag of this tree): build it (run without SKIP_BUILD) or set IMAGE_TAG to a tag 'minikube image ls' lists"
    done
fi

helm_repos
ensure_namespace
ensure_secret
install_ingress_nginx --values "$HELM_CONFIG_DIR/ingress-nginx-minikube-values.yaml"
install_stores --values "$HELM_CONFIG_DIR/redis-minikube-values.yaml"
install_rabbitmq --values "$HELM_CONFIG_DIR/rabbitmq-minikube-values.yaml"
# The manifests name the placeholder images fleet/<service>:latest; apply a copy that names
# this build's, so a new tag changes the pod templates.
rendered=$(mktemp -d)
trap 'rm -rf "$rendered"' EXIT
render_manifests "$rendered" "fleet/"
apply_manifests "$rendered"
apply_monitoring
wait_for_services

gateway="http://$(minikube ip):30080"
log "the fleet answers on $gateway (e.g. curl -X POST $gateway/stock/item/create/5)"
echo "    (with the docker driver on macOS/Windows: minikube service -n ingress-nginx ingress-nginx-controller --url)"
