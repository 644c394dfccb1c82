#!/bin/bash
# Health probe for the service images, without curl: sends `GET <path>` (default /health)
# to the port of BIND_ADDR on 127.0.0.1 and succeeds on an HTTP 200 status line.
#
# usage: healthcheck [/health|/ready]
set -euo pipefail

path=${1:-/health}
addr=${BIND_ADDR:-0.0.0.0:8080}
port=${addr##*:}

if ! exec 3<>"/dev/tcp/127.0.0.1/${port}"; then
    echo "unhealthy: nothing listens on port ${port}" >&2
    exit 1
fi
printf 'GET %s HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n' "$path" >&3
status=""
IFS= read -r -t 3 status <&3 || true
exec 3>&-
case "$status" in
    "HTTP/1."?" 200"*) exit 0 ;;
    *)
        echo "unhealthy: GET ${path} answered '${status%$'\r'}'" >&2
        exit 1
        ;;
esac
