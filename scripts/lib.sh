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
# issue prefers, is a far larger build than the test budget allows here.
S3S_FS_VERSION=0.14.1
ensure_s3s_fs() {
    local root=/var/cache/slipway-test/s3s-fs-$S3S_FS_VERSION
    [ -x "$root/bin/s3s-fs" ] && return 0
    echo "==> cargo install s3s-fs $S3S_FS_VERSION (once, into $root)" >&2
    mkdir -p "$root"
    cargo install --quiet --locked s3s-fs --version "$S3S_FS_VERSION" --features binary --root "$root"
}
