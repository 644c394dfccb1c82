#!/bin/sh
# Starts one Redis data node of a Sentinel-managed set in docker-compose.
#
# The first start writes /data/redis.conf (AOF with appendfsync everysec, the node's
# announced hostname, and `replicaof` for a replica). Later starts reuse that file, which
# Sentinel rewrites on a failover (CONFIG REWRITE), so a restarted old master comes back as
# a replica of the new one instead of as a second master. The password is passed on every
# start, so changing env/redis.env takes effect at the next restart.
#
# Also on every start (so volumes made before it get it too): while this node is a master it
# refuses writes unless a replica is connected and acknowledged within 10 s
# (min-replicas-to-write 1, min-replicas-max-lag 10; 10 s so that a busy machine does not make
# a healthy replica count as missing). A replica ignores both until it is promoted. Its
# replicas' initial sync is not a write, so a master that starts first still lets them attach.
# A full store refuses writes (maxmemory-policy noeviction, stated although it is Redis'
# default), never drops keys. Compose sets no memory limit on these containers, so there is
# no maxmemory here; the k8s nodes have one (helm-config/redis-values.yaml).
# Hashes with values up to 256 bytes stay listpacks (hash-max-ziplist-value 256, the name
# Redis 6 and 7 both accept): a saga record then takes ~0.9 KB instead of ~2 KB.
#
# Environment: REDIS_PASSWORD (env/redis.env), NODE_HOSTNAME (this node's compose name),
# REPLICA_OF (the master's compose name; empty or unset for the initial master).
set -eu

: "${REDIS_PASSWORD:?set REDIS_PASSWORD (env/redis.env)}"
: "${NODE_HOSTNAME:?set NODE_HOSTNAME to the compose service name of this node}"

conf=/data/redis.conf
if [ ! -s "$conf" ]; then
    {
        echo "port 6379"
        echo "dir /data"
        echo "appendonly yes"
        echo "appendfsync everysec"
        echo "replica-announce-ip ${NODE_HOSTNAME}"
        echo "replica-serve-stale-data yes"
        if [ -n "${REPLICA_OF:-}" ]; then
            echo "replicaof ${REPLICA_OF} 6379"
        fi
    } >"$conf.tmp"
    mv "$conf.tmp" "$conf"
fi

# The image's entrypoint fixes the ownership of /data and drops to the redis user.
exec docker-entrypoint.sh redis-server "$conf" \
    --requirepass "$REDIS_PASSWORD" --masterauth "$REDIS_PASSWORD" \
    --min-replicas-to-write 1 --min-replicas-max-lag 10 --maxmemory-policy noeviction \
    --hash-max-ziplist-value 256
