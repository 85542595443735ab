# Sourced by the scripts: makes sure PostgreSQL server binaries, pg_cron, openssl, systemd-analyze
# and promtool are installed, and builds the mvrefresh_capture extension
# (Debian/Ubuntu packages), installing what is missing. Sets PG_BIN to the newest server's bin
# directory.

as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
        echo "need root to run: $*" >&2; return 1; fi
}

apt_updated=
apt_install() {
    if [ -z "$apt_updated" ]; then
        as_root apt-get update -qq >/dev/null
        apt_updated=1
    fi
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

newest_pg_bin() {
    ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1
}

ensure_postgres() {
    if [ -z "$(newest_pg_bin)" ] || [ ! -x "$(newest_pg_bin)/initdb" ]; then
        echo "installing PostgreSQL server binaries (apt-get)..." >&2
        apt_install postgresql postgresql-contrib
    fi
    PG_BIN=$(newest_pg_bin)
    PG_VERSION=$(basename "$(dirname "$PG_BIN")")
    if [ ! -f "/usr/lib/postgresql/$PG_VERSION/lib/pg_cron.so" ]; then
        echo "installing pg_cron for PostgreSQL $PG_VERSION (apt-get)..." >&2
        apt_install "postgresql-$PG_VERSION-cron" || echo "warning: pg_cron could not be installed" >&2
    fi
    command -v psql >/dev/null || apt_install postgresql-client
    # The TLS tests make a throwaway CA and server certificate with the openssl CLI.
    command -v openssl >/dev/null || apt_install openssl
    # The unit-file test runs `systemd-analyze verify`; the alert rules' tests run `promtool`.
    command -v systemd-analyze >/dev/null || apt_install systemd
    command -v promtool >/dev/null || apt_install prometheus
    export PG_BIN PG_VERSION
    export MVREFRESH_TEST_PG_BIN="$PG_BIN"
}

# mvrefresh_capture (extension/), built with PostgreSQL's extension build system and installed
# for PostgreSQL $PG_VERSION: the native capture's tests create it in their databases. Needs the
# server's development files (postgresql-server-dev-N, apt). Built under target/, so the source
# directory stays clean; with_llvm=no: no JIT bitcode (no clang needed at build time).
ensure_capture_extension() {
    local pg_config=/usr/lib/postgresql/$PG_VERSION/bin/pg_config
    if [ ! -x "$pg_config" ] || [ ! -f "/usr/include/postgresql/$PG_VERSION/server/postgres.h" ]; then
        echo "installing postgresql-server-dev-$PG_VERSION (apt-get) to build extension/..." >&2
        apt_install "postgresql-server-dev-$PG_VERSION"
    fi
    local build=${CARGO_TARGET_DIR:-$PWD/target}/extension
    rm -rf "$build" && mkdir -p "$build" && cp extension/* "$build/"
    make -s -C "$build" PG_CONFIG="$pg_config" with_llvm=no >/dev/null
    as_root make -s -C "$build" PG_CONFIG="$pg_config" with_llvm=no install >/dev/null
}

# kubernetes-validate (PyPI; the Kubernetes API's schemas, offline once installed), in a virtual
# environment under target/tools, put on PATH. The manifests' test runs it.
ensure_kubernetes_validate() {
    command -v kubernetes-validate >/dev/null && return 0
    local venv=${CARGO_TARGET_DIR:-$PWD/target}/tools/kubernetes-validate
    if [ ! -x "$venv/bin/kubernetes-validate" ]; then
        echo "installing kubernetes-validate into $venv (pip)..." >&2
        python3 -m venv "$venv" 2>/dev/null || { apt_install python3-venv && python3 -m venv "$venv"; }
        "$venv/bin/pip" install -q 'kubernetes-validate==1.37.0'
    fi
    export PATH="$venv/bin:$PATH"
}
