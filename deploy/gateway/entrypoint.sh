#!/bin/sh
# Entry point of the compose gateway: points nginx at the DNS server of the container's own
# network, then hands over to the nginx image's entrypoint.
#
# That server is the first `nameserver` of /etc/resolv.conf: Docker's embedded DNS
# (127.0.0.11), podman's (the network's gateway address) or a cluster's DNS. Never a fixed
# address (Docker's is not podman's), and only the first: podman lists the host's servers
# after its own, and nginx asks the servers of a `resolver` in turn and takes an NXDOMAIN
# from a host server (which knows no `stock`) for the answer, a 502. (The official image's
# NGINX_ENTRYPOINT_LOCAL_RESOLVERS takes every nameserver, so it is not used.)
#
# Writes /etc/nginx/conf.d/gateway-resolver.conf, which deploy/gateway/nginx.conf includes.
set -eu

ns=$(awk '$1 == "nameserver" { print $2; exit }' /etc/resolv.conf)
if [ -z "$ns" ]; then
    echo "gateway: no nameserver in /etc/resolv.conf: nginx could not resolve the services" >&2
    exit 1
fi
case "$ns" in
    *:*) ns="[$ns]" ;;
esac
mkdir -p /etc/nginx/conf.d
printf 'resolver %s valid=5s ipv6=off;\n' "$ns" >/etc/nginx/conf.d/gateway-resolver.conf
echo "gateway: resolver $ns (first nameserver of /etc/resolv.conf)"

exec /docker-entrypoint.sh "$@"
