#!/usr/bin/env bash
# gc benchmark: `hydrafy gc` against `nix-store --delete` of the same store
# paths, and how long hydrafy held Nix's big lock (what running jobs wait for).
#
# It makes one store with real Nix (nix-instantiate into a chroot store):
# PATHS text files in chains of ten (each references the one before, as
# builds reference their inputs) and TREES directories of 40 files each. All
# of them are garbage (no state file, no roots). Then, RUNS times and
# alternating which goes first, on fresh copies of that store:
#   - `hydrafy gc COPY --keep-days 0`, with its clock 400 days ahead (the copy
#     was made just now, and gc counts a path's arrival in the store as use);
#   - `nix-store --store local?root=COPY --delete` of every path.
# Both must leave a store that `nix-store --verify --check-contents` accepts
# and that registers nothing. Reports the medians, their ratio, and hydrafy's
# lock hold times (median and longest).
#
# usage: scripts/gc-bench.sh [--paths N] [--trees N] [--runs N] [--work DIR]
# needs: nix-bin (nix-instantiate, nix-store), sqlite3, python3, a Rust toolchain
set -euo pipefail

paths=3000
trees=100
runs=5
work=${TMPDIR:-/tmp}/hydrafy-gc-bench
here=$(cd "$(dirname "$0")/.." && pwd)
while [ $# -gt 0 ]; do
    case $1 in
        --paths) paths=$2; shift 2 ;;
        --trees) trees=$2; shift 2 ;;
        --runs) runs=$2; shift 2 ;;
        --work) work=$2; shift 2 ;;
        *) echo "unknown option $1" >&2; exit 2 ;;
    esac
done
for tool in nix-instantiate nix-store sqlite3 python3 cargo; do
    command -v "$tool" >/dev/null || { echo "gc-bench.sh needs $tool (apt-get install nix-bin sqlite3 python3)" >&2; exit 2; }
done

(cd "$here" && cargo build --release --quiet)
hydrafy=$here/target/release/hydrafy
rm -rf "$work"; mkdir -p "$work/home"
export HOME=$work/home XDG_CACHE_HOME=$work/home/cache
store() { echo "local?root=$1"; }

# The store: chained text files and small trees.
mkdir -p "$work/src"
for t in $(seq 0 $((trees - 1))); do
    mkdir -p "$work/src/t$t/share"
    for f in $(seq 0 39); do printf 'tree %s file %s\n' "$t" "$f" > "$work/src/t$t/share/f$f"; done
done
nix-instantiate --store "$(store "$work/base")" --read-write-mode --eval --strict --json -E "
  let
    pad = builtins.concatStringsSep \"\" (builtins.genList (x: \"0123456789abcdef\") 64);
    ps = builtins.genList (i: builtins.toFile \"p-\${toString i}\"
      (\"\${toString i}\n\" + pad + (if i > 0 && i - (i / 10) * 10 != 0 then builtins.elemAt ps (i - 1) else \"\"))) $paths;
    ts = builtins.genList (i: builtins.path { path = $work/src + \"/t\${toString i}\"; name = \"tree-\${toString i}\"; }) $trees;
  in ps ++ ts" > "$work/paths.json"
count=$(python3 -c 'import json,sys; print(len(json.load(open(sys.argv[1]))))' "$work/paths.json")
python3 -c 'import json,sys; print("\n".join(json.load(open(sys.argv[1]))))' "$work/paths.json" > "$work/paths.txt"
files=$(find "$work/base/nix/store" -mindepth 1 | wc -l)
echo "store: $count store paths ($paths chained files, $trees trees), $files files and directories"
echo "machine: $(nproc) cores, $(sed -n 's/^model name\s*: //p' /proc/cpuinfo | head -1)"

now_later=$(( $(date +%s) + 400 * 86400 ))
secs() { python3 -c 'import sys; print(f"{(int(sys.argv[2]) - int(sys.argv[1])) / 1e9:.3f}")' "$1" "$2"; }
check_empty() { # root: Nix accepts it and it registers nothing
    nix-store --store "$(store "$1")" --verify --check-contents > "$work/verify.log" 2>&1 &&
        ! grep -qi error "$work/verify.log" || { cat "$work/verify.log" >&2; echo "nix-store --verify failed on $1" >&2; exit 1; }
    left=$(sqlite3 "$1/nix/var/nix/db/db.sqlite" 'select count(*) from ValidPaths')
    [ "$left" = 0 ] || { echo "$1 still registers $left paths" >&2; exit 1; }
}
run_hydrafy() {
    rm -rf "$work/h"; cp -a "$work/base" "$work/h"; sync
    local t0 t1; t0=$(date +%s%N)
    "$hydrafy" gc "$work/h" --keep-days 0 --now "$now_later" --json -q > "$work/h.json" 2> "$work/h.err" ||
        { cat "$work/h.err" >&2; exit 1; }
    t1=$(date +%s%N)
    check_empty "$work/h"
    python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); assert r["deleted_paths"] == int(sys.argv[2]), r["deleted_paths"]; print(r["lock_held_seconds"])' \
        "$work/h.json" "$count" >> "$work/held"
    secs "$t0" "$t1" >> "$work/hydrafy"
}
run_nix() {
    rm -rf "$work/n"; cp -a "$work/base" "$work/n"; sync
    local t0 t1; t0=$(date +%s%N)
    xargs -a "$work/paths.txt" nix-store --store "$(store "$work/n")" --delete > "$work/n.log" 2>&1 ||
        { cat "$work/n.log" >&2; exit 1; }
    t1=$(date +%s%N)
    check_empty "$work/n"
    secs "$t0" "$t1" >> "$work/nix"
}
: > "$work/hydrafy"; : > "$work/nix"; : > "$work/held"
for r in $(seq "$runs"); do
    if [ $((r % 2)) = 1 ]; then run_hydrafy; run_nix; else run_nix; run_hydrafy; fi
    echo "run $r: hydrafy gc $(tail -1 "$work/hydrafy") s (lock held $(tail -1 "$work/held") s), nix-store --delete $(tail -1 "$work/nix") s"
done
python3 - "$work" <<'PY'
import statistics, sys
work = sys.argv[1]
read = lambda name: [float(x) for x in open(f"{work}/{name}").read().split()]
h, n, held = read("hydrafy"), read("nix"), read("held")
mh, mn = statistics.median(h), statistics.median(n)
print(f"hydrafy gc:         median {mh:.3f} s")
print(f"nix-store --delete: median {mn:.3f} s")
print(f"ratio hydrafy/nix:  {mh / mn:.2f}")
print(f"lock held:          median {statistics.median(held) * 1e3:.1f} ms, longest {max(held) * 1e3:.1f} ms")
PY
