# Shared helpers for scripts/*: install what is missing, and nothing else.
# shellcheck shell=bash

# ensure_apt PKG...: apt-get install the packages that are not installed yet.
ensure_apt() {
    local missing=()
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        echo "==> apt-get install ${missing[*]}" >&2
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
}

# ensure_pip MODULE PACKAGE: pip install PACKAGE unless python3 can import MODULE.
ensure_pip() {
    python3 -c "import $1" 2>/dev/null && return 0
    echo "==> pip install $2" >&2
    python3 -m pip install -q --root-user-action=ignore "$2" 2>/dev/null || python3 -m pip install -q "$2"
}

# ensure_rust: cargo must exist (the toolchain itself comes from rust-toolchain.toml),
# and so must what crates need at build time: protoc for etcd-client's gRPC code.
ensure_rust() {
    command -v cargo >/dev/null || { echo "error: cargo is not installed (install Rust with rustup)" >&2; exit 1; }
    ensure_apt "${BUILD_PACKAGES[@]}"
}

# What crates need at build time.
BUILD_PACKAGES=(protobuf-compiler)

# The packages the whole-system tests and the quickstart use.
RUNTIME_PACKAGES=(runc skopeo podman umoci busybox-static curl openssl ca-certificates docker-registry docker.io)

# ensure_s3s_fs: the S3-compatible server the object-storage tests start
# (`s3s-fs` from crates.io), built once and kept outside the repository, keyed by
# its version (crates/slipway-testkit: S3S_FS_VERSION). Garage, the server the
# issue prefers, is a far larger build than the test budget allows here (README).
S3S_FS_VERSION=0.14.1
ensure_s3s_fs() {
    local root=/var/cache/slipway-test/s3s-fs-$S3S_FS_VERSION
    [ -x "$root/bin/s3s-fs" ] && return 0
    echo "==> cargo install s3s-fs $S3S_FS_VERSION (once, into $root)" >&2
    mkdir -p "$root"
    cargo install --quiet --locked s3s-fs --version "$S3S_FS_VERSION" --features binary --root "$root"
}

# ensure_garage: Garage (crates.io `garage`), the S3 server self-hosters run, for
# the S3 benchmark (Distribution's s3 driver needs ListMultipartUploads, which
# s3s-fs lacks). Built once, kept outside the repository, keyed by version. A long
# build (it compiles libsodium and SQLite from C): not part of scripts/test.
GARAGE_VERSION=2.5.0
GARAGE_BIN=/var/cache/slipway-test/garage-$GARAGE_VERSION/bin/garage
ensure_garage() {
    local root=/var/cache/slipway-test/garage-$GARAGE_VERSION
    [ -x "$GARAGE_BIN" ] && return 0
    echo "==> cargo install garage $GARAGE_VERSION (once, into $root; a long build)" >&2
    mkdir -p "$root"
    cargo install --quiet --locked garage --version "$GARAGE_VERSION" --root "$root"
}

# start_garage DIR PORT KEY_ID SECRET BUCKET: a one-node Garage in DIR with its S3
# API on 127.0.0.1:PORT (RPC and admin on PORT+1, PORT+2), one bucket and one key
# allowed on it; prints its PID. KEY_ID is GK + 24 hex digits, SECRET 64.
start_garage() {
    local dir=$1 port=$2 key=$3 secret=$4 bucket=$5 cfg pid id
    cfg="$dir/garage.toml"
    mkdir -p "$dir/meta" "$dir/data"
    cat >"$cfg" <<TOML
metadata_dir = "$dir/meta"
data_dir = "$dir/data"
db_engine = "sqlite"
replication_factor = 1
rpc_bind_addr = "127.0.0.1:$((port + 1))"
rpc_public_addr = "127.0.0.1:$((port + 1))"
rpc_secret = "$(openssl rand -hex 32)"
[s3_api]
s3_region = "us-east-1"
api_bind_addr = "127.0.0.1:$port"
root_domain = ".s3.localhost"
[admin]
api_bind_addr = "127.0.0.1:$((port + 2))"
TOML
    "$GARAGE_BIN" -c "$cfg" server >"$dir/garage.log" 2>&1 &
    pid=$!
    for _ in $(seq 100); do id=$("$GARAGE_BIN" -c "$cfg" node id -q 2>/dev/null) && break; sleep 0.2; done
    [ -n "${id:-}" ] || { echo "garage did not start: $(tail -5 "$dir/garage.log")" >&2; return 1; }
    "$GARAGE_BIN" -c "$cfg" layout assign -z dc1 -c 100GB "${id%@*}" >/dev/null
    "$GARAGE_BIN" -c "$cfg" layout apply --version 1 >/dev/null
    "$GARAGE_BIN" -c "$cfg" key import --yes -n bench "$key" "$secret" >/dev/null
    "$GARAGE_BIN" -c "$cfg" bucket create "$bucket" >/dev/null
    "$GARAGE_BIN" -c "$cfg" bucket allow --read --write --owner "$bucket" --key "$key" >/dev/null
    echo "$pid"
}
