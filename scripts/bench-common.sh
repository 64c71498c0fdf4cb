# Sourced by the benchmark scripts: what each does first (bench_start), and
# the throwaway distribution registry they push to (start_registry), on a
# free loopback port, storing under $work/registry, stopped when the script
# exits. Expects $here (the checkout) and $work.
# shellcheck shell=bash

# bench_start SCRIPT "PACKAGES" TOOL...: stop with what to install when a
# TOOL is missing; build target/release/hydrafy ($hydrafy); empty $work;
# start the registry ($reg).
bench_start() {
    local script=$1 packages=$2 tool
    shift 2
    for tool in "$@"; do
        command -v "$tool" >/dev/null || { echo "$script needs $tool (apt-get install $packages)" >&2; exit 2; }
    done
    (cd "$here" && cargo build --locked --release --quiet)
    hydrafy=${CARGO_TARGET_DIR:-$here/target}/release/hydrafy
    rm -rf "$work"; mkdir -p "$work"
    start_registry
}

start_registry() {
    local port
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    reg=127.0.0.1:$port
    mkdir -p "$work/registry"
    cat > "$work/registry/config.yml" <<YML
version: 0.1
log: {level: error}
storage: {filesystem: {rootdirectory: $work/registry/storage}}
http: {addr: $reg}
YML
    docker-registry serve "$work/registry/config.yml" > "$work/registry/log" 2>&1 &
    registry_pid=$!
    trap 'kill $registry_pid 2>/dev/null || true' EXIT
    for _ in $(seq 100); do curl -fsS "http://$reg/v2/" >/dev/null 2>&1 && return 0; sleep 0.1; done
    echo "the registry did not start; see $work/registry/log" >&2
    exit 1
}
