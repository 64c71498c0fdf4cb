#!/usr/bin/env bash
# Upgrade benchmark: what a `fetch --merge` costs against a fresh fetch of the
# same image, and `hydrafy verify` against `nix-store --verify
# --check-contents` on the same store.
#
# It starts a throwaway distribution registry on loopback and pushes two
# scripts/make-nixlike.py images from the same candidate directories: the
# image (the default --mb 400, about 100 store paths) and an older, smaller
# one (--mb SEED_MB, default 365: a prefix of the same directories, so on
# Debian 12 the image adds about 12% new paths). Then, in one run:
#   1. fetch the image cold (empty cache): wall time, peak RSS; nix-store
#      --verify --check-contents must pass on the result;
#   2. the same command again (a no-op);
#   3. fetch the older image as the seed, then `fetch --merge` the image into
#      it, and a fresh `fetch` of the image into a new DIR; both --no-cache,
#      the page cache dropped before each (when run as root);
#   4. `hydrafy verify` and `nix-store --verify --check-contents` on the
#      merged seed, alternately, three times each.
#
# usage: scripts/upgrade-bench.sh [--mb N] [--seed-mb N] [--work DIR]
#   (--mb: the image's size, default 400; a quick check: --mb 80 --seed-mb 60)
# needs: docker-registry python3 nix-bin pigz curl /usr/bin/time
set -euo pipefail

image_mb=400
seed_mb=365
work=${TMPDIR:-/tmp}/hydrafy-upgrade-bench
here=$(cd "$(dirname "$0")/.." && pwd)
make_nixlike=$here/scripts/make-nixlike.py
while [ $# -gt 0 ]; do
    case $1 in
        --mb) image_mb=$2; shift 2 ;;
        --seed-mb) seed_mb=$2; shift 2 ;;
        --work) work=$2; shift 2 ;;
        *) echo "unknown option $1" >&2; exit 2 ;;
    esac
done
# shellcheck source=scripts/bench-common.sh
. "$here/scripts/bench-common.sh"
bench_start upgrade-bench.sh "docker-registry python3 nix-bin pigz curl time" docker-registry python3 nix-store nix-instantiate pigz curl /usr/bin/time

push() { # repo [make-nixlike.py args] -> index digest
    local out
    out=$(python3 "$make_nixlike" "$work/src-$1" "$reg" "nixos/$1" "${@:2}")
    rm -rf "$work/src-$1"
    python3 -c 'import json,sys; print(json.loads(sys.argv[1])["index"])' "$out"
}
image=nixos/image@$(push image --mb "$image_mb")
older=nixos/older@$(push older --mb "$seed_mb")
drop_caches() { sync; [ -w /proc/sys/vm/drop_caches ] && echo 3 > /proc/sys/vm/drop_caches || true; }
timed() { # label cmd... : prints "label: S s, R MB"; the command's stdout goes to $work/stdout
    local label=$1; shift
    /usr/bin/time -f "%e %M" -o "$work/time" "$@" >"$work/stdout" 2>"$work/stderr" || { cat "$work/stderr" >&2; exit 1; }
    read -r secs kb < "$work/time"
    printf '%-44s %6.2f s  %4d MB\n' "$label:" "$secs" $((kb / 1024))
    echo "$secs" > "$work/last"
}
nix_ok() { # root: nix-store --verify --check-contents must pass
    nix-store --store "local?root=$1" --verify --check-contents > "$work/nix.log" 2>&1 &&
        ! grep -qi error "$work/nix.log" || { cat "$work/nix.log" >&2; echo "nix-store --verify failed on $1" >&2; exit 1; }
}
cd "$work"

echo "machine: $(nproc) cores, $(sed -n 's/^model name\s*: //p' /proc/cpuinfo | head -1)"
drop_caches
timed "fetch, cold cache" env XDG_CACHE_HOME="$work/cache" "$hydrafy" fetch --plain-http -q "$reg/$image" -o fresh
nix_ok "$work/fresh"
echo "  nix-store --verify --check-contents: ok ($(ls fresh/nix/store | wc -l) store entries, $(find fresh/nix/store | wc -l) files and dirs)"
timed "the same command again (no-op)" env XDG_CACHE_HOME="$work/cache" "$hydrafy" fetch --plain-http -q "$reg/$image" -o fresh

"$hydrafy" fetch --plain-http -q --no-cache "$reg/$older" -o seed
new=$(comm -13 <(ls seed/nix/store | sort) <(ls fresh/nix/store | sort) | wc -l)
echo "seed: $(ls seed/nix/store | wc -l) store entries; the image adds $new of its $(ls fresh/nix/store | wc -l)"
drop_caches
timed "fetch --merge into the seed, --no-cache" "$hydrafy" fetch --plain-http -q --no-cache --merge --json "$reg/$image" -o seed
merge=$(cat "$work/last"); cp "$work/stdout" merge.json
drop_caches
timed "fresh fetch of the image, --no-cache" "$hydrafy" fetch --plain-http -q --no-cache "$reg/$image" -o fresh2
fresh=$(cat "$work/last")
nix_ok "$work/seed"
python3 - merge.json <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
print(f"  merge downloaded {d['bytes_downloaded'] / 1e6:.1f} MB, added {len(d['merge']['added'])} paths")
PY
python3 -c 'import sys; m,f=map(float,sys.argv[1:]); print(f"  merge / fresh fetch: {m/f:.2f}")' "$merge" "$fresh"

"$hydrafy" verify -q seed  # warm the page cache for both tools alike
for r in 1 2 3; do
    timed "hydrafy verify (run $r)" "$hydrafy" verify -q seed; echo "$(cat "$work/last")" >> hv
    timed "nix-store --verify --check-contents (run $r)" nix-store --store "local?root=$work/seed" --verify --check-contents
    echo "$(cat "$work/last")" >> nv
done
python3 -c 'import statistics as s,sys; h=s.median(map(float,open("hv"))); n=s.median(map(float,open("nv"))); print(f"  verify medians: hydrafy {h:.2f} s, nix-store {n:.2f} s, ratio {h/n:.2f}")'
