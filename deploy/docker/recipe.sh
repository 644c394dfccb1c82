#!/bin/sh
# Builds the dependency "recipe" of the workspace for the Dockerfile's cached layer:
# every Cargo.toml and Cargo.lock (and .cargo/config.toml) copied as they are, and every
# build target root (src/lib.rs, src/main.rs, src/bin/*, build.rs, benches, examples, tests)
# replaced by an empty stand-in. Compiling the recipe compiles all dependencies; the result
# changes only when the manifests or the set of targets change.
#
# usage: recipe.sh <workspace dir> <output dir>
set -eu

src=${1:?usage: recipe.sh <workspace dir> <output dir>}
out=${2:?usage: recipe.sh <workspace dir> <output dir>}

cd "$src"
mkdir -p "$out"

find . \( -path ./target -o -path ./.git \) -prune -o -type f \
    \( -name Cargo.toml -o -name Cargo.lock -o -path ./.cargo/config.toml \) -print |
    while IFS= read -r f; do
        mkdir -p "$out/$(dirname "$f")"
        cp "$f" "$out/$f"
    done

find . \( -path ./target -o -path ./.git \) -prune -o -type f -name '*.rs' \
    \( -path '*/src/lib.rs' -o -path '*/src/main.rs' -o -path '*/src/bin/*' \
    -o -name build.rs -o -path '*/benches/*' -o -path '*/examples/*' -o -path '*/tests/*' \) -print |
    while IFS= read -r f; do
        mkdir -p "$out/$(dirname "$f")"
        case "$f" in
            */src/lib.rs) : >"$out/$f" ;;
            *) echo 'fn main() {}' >"$out/$f" ;;
        esac
    done
