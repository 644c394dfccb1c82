#!/bin/sh
# Starts one Redis Sentinel in docker-compose, monitoring every master of the fleet.
#
# Sentinel must be able to rewrite its config file (it records failovers, replicas and the
# other Sentinels there), so the file lives in the Sentinel's own volume: written from the
# environment on the first start, reused afterwards so a restarted Sentinel keeps what it
# learned (a template would be overwritten by the first failover anyway).
#
# Environment:
#   REDIS_PASSWORD          password of the data nodes (env/redis.env)
#   SENTINEL_HOSTNAME       this Sentinel's compose service name (announced to the others)
#   SENTINEL_MASTERS        space-separated name=host pairs, e.g. "order=redis-order-master"
#   SENTINEL_QUORUM         default 2
#   SENTINEL_DOWN_AFTER_MS  default 2000
#   SENTINEL_FAILOVER_TIMEOUT_MS default 3000 (see env/sentinel.env)
set -eu

: "${REDIS_PASSWORD:?set REDIS_PASSWORD (env/redis.env)}"
: "${SENTINEL_HOSTNAME:?set SENTINEL_HOSTNAME to the compose service name of this Sentinel}"
: "${SENTINEL_MASTERS:?set SENTINEL_MASTERS, e.g. order=redis-order-master}"
quorum=${SENTINEL_QUORUM:-2}
down_after=${SENTINEL_DOWN_AFTER_MS:-2000}
failover_timeout=${SENTINEL_FAILOVER_TIMEOUT_MS:-3000}

conf=/data/sentinel.conf
if [ ! -s "$conf" ]; then
    {
        echo "port 26379"
        echo "dir /data"
        # No Sentinel password here (the compose network is private): without one,
        # protected mode would refuse every client that is not on loopback.
        echo "protected-mode no"
        # Hostnames, not container IPs: IPs change when a container is recreated.
        echo "sentinel resolve-hostnames yes"
        echo "sentinel announce-hostnames yes"
        echo "sentinel announce-ip ${SENTINEL_HOSTNAME}"
        for pair in ${SENTINEL_MASTERS}; do
            name=${pair%%=*}
            host=${pair#*=}
            if [ -z "$name" ] || [ -z "$host" ] || [ "$name" = "$pair" ]; then
                echo "sentinel.sh: bad SENTINEL_MASTERS entry '${pair}' (want name=host)" >&2
                exit 1
            fi
            echo "sentinel monitor ${name} ${host} 6379 ${quorum}"
            echo "sentinel auth-pass ${name} ${REDIS_PASSWORD}"
            echo "sentinel down-after-milliseconds ${name} ${down_after}"
            echo "sentinel failover-timeout ${name} ${failover_timeout}"
            echo "sentinel parallel-syncs ${name} 1"
        done
    } >"$conf.tmp"
    mv "$conf.tmp" "$conf"
fi

# `redis-server <conf> --sentinel` is redis-sentinel; through the image's entrypoint it
# runs as the redis user.
exec docker-entrypoint.sh redis-server "$conf" --sentinel
