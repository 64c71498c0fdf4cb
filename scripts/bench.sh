#!/usr/bin/env bash
# End-to-end benchmark: hydrafy fetch (cold cache) against skopeo copy + umoci
# unpack, against the naive, unverified `curl | tar -xz` of every layer, and
# against the file system's floor: GNU `tar -xf` of the layers, already
# inflated and in the page cache, in order, into an empty folder (no network,
# no inflate, no hashing, no checks: what every extractor pays on this disk).
#
# It starts a throwaway distribution registry on loopback, pushes realistic
# Nix-layered images (scripts/make-nixlike.py: one store path per layer, a
# real Nix database), and times the three pipelines ALTERNATELY, run after run, so that
# disk and page-cache drift hits all of them alike. Wall time and peak RSS come
# from /usr/bin/time; the report gives medians and ratios against the peers of
# the same run. (hyperfine runs each command's repetitions back to back and
# cannot report memory, which is why this loop is hand-rolled.)
#
# usage: scripts/bench.sh [--runs N] [--images full,half,big,cuda] [--work DIR]
#                         [--tools LIST] [--baseline BIN]
#   full: make-nixlike.py --mb 400 (about 100 layers, 400 MB in 90 directories of /usr)
#   half: make-nixlike.py --mb 200
#   big:  one 2 GB layer (real files from /usr/lib under one store path)
#   cuda: make-nixlike.py --cuda (600 store paths, 5 GB, about 200,000 files, two
#         files of 1.1 GB); not in the default list: it needs about 45 GB of disk
#         and runs only hydrafy and the floor unless --tools says otherwise
#   --tools: of hydrafy,floor,skopeo+umoci,curl+tar (default: all of them)
#   --baseline BIN: also time another hydrafy binary (say, one built from an
#         older commit) as "baseline", alternating with the others
# needs: docker-registry skopeo umoci curl pigz python3 nix-bin (apt-get install ...)
set -euo pipefail

runs=5
images=full,half,big
tools_opt=""
baseline=""
work=${TMPDIR:-/tmp}/hydrafy-bench
here=$(cd "$(dirname "$0")/.." && pwd)
while [ $# -gt 0 ]; do
    case $1 in
        --runs) runs=$2; shift 2 ;;
        --images) images=$2; shift 2 ;;
        --work) work=$2; shift 2 ;;
        --tools) tools_opt=$2; shift 2 ;;
        --baseline) baseline=$(realpath "$2"); shift 2 ;;
        *) echo "unknown option $1" >&2; exit 2 ;;
    esac
done
# shellcheck source=scripts/bench-common.sh
. "$here/scripts/bench-common.sh"
bench_start bench.sh "docker-registry skopeo umoci curl pigz python3 nix-bin time" docker-registry skopeo umoci curl pigz python3 nix-instantiate /usr/bin/time

# shellcheck source=scripts/bench-images.sh
. "$here/scripts/bench-images.sh"

declare -A ref
for img in ${images//,/ }; do
    ref[$img]=$(push_image "$img")
done

layers_of() { # repo@digest -> layer digests, one per line
    local repo=${1%@*} digest=${1#*@}
    curl -fsS -H 'Accept: application/vnd.docker.distribution.manifest.v2+json' "http://$reg/v2/$repo/manifests/$digest" |
        python3 -c 'import json,sys; [print(l["digest"]) for l in json.load(sys.stdin)["layers"]]'
}

results=$work/results.tsv
: > "$results"
# ext4 scans past inodes freed in the last minute (five if their table block is
# dirty) when it allocates new ones, which makes creating files right after a
# big `rm -rf` several times slower. Runs therefore never delete: every run
# writes a fresh directory, and the outputs of an image are removed only after
# its last run, followed by a sync and a pause before the next image.
# (Each tool runs once untimed first, and the timed rounds rotate which tool
# goes first, so no tool always meets a cold registry or a busy disk.)
# The floor's input: every layer of the image inflated once, before the
# timed rounds (and kept in the page cache by each floor run reading it).
inflate_layers() { # image
    local img=$1 n=0 dir=$work/inflated/$1
    rm -rf "$dir"; mkdir -p "$dir"
    for l in $(layers_of "${ref[$img]}"); do
        n=$((n + 1))
        curl -fsS "http://$reg/v2/${ref[$img]%@*}/blobs/$l" | gzip -dc > "$dir/$(printf %04d $n).tar"
    done
}

run_one() { # image tool run
    local img=$1 tool=$2 run=$3 out=$work/out/$1-$2-$3
    mkdir -p "$out"; sync
    case $tool in
        hydrafy)
            cmd=("env" "XDG_CACHE_HOME=$out/cache" "$hydrafy" fetch --plain-http -q "$reg/${ref[$img]}" -o "$out/nix-backup") ;;
        baseline)
            cmd=("env" "XDG_CACHE_HOME=$out/cache" "$baseline" fetch --plain-http -q "$reg/${ref[$img]}" -o "$out/nix-backup") ;;
        floor)
            cmd=(sh -c "set -e; for f in $work/inflated/$img/*.tar; do tar -xf \$f -C $out; done") ;;
        skopeo+umoci)
            cmd=(sh -c "skopeo copy -q --src-tls-verify=false docker://$reg/${ref[$img]} oci:$out/layout:img && umoci unpack --rootless --image $out/layout:img $out/bundle") ;;
        curl+tar)
            local script="set -e"
            for l in $(layers_of "${ref[$img]}"); do script="$script; curl -fsS http://$reg/v2/${ref[$img]%@*}/blobs/$l | tar -xz -C $out"; done
            cmd=(sh -c "$script") ;;
    esac
    /usr/bin/time -f "%e %M" -o "$work/time" "${cmd[@]}" >/dev/null 2>"$work/stderr" || { cat "$work/stderr" >&2; echo "$tool failed on $img" >&2; exit 1; }
    printf '%s\t%s\t%s\t%s\n' "$img" "$tool" "$(cat "$work/time" | tr ' ' '\t')" "$run" >> "$results"
}

for img in ${images//,/ }; do
    if [ -n "$tools_opt" ]; then
        IFS=, read -r -a tools <<< "$tools_opt"
    elif [ "$img" = cuda ]; then
        tools=(hydrafy floor)
    else
        tools=(hydrafy floor skopeo+umoci curl+tar)
    fi
    [ -n "$baseline" ] && tools+=(baseline)
    for tool in "${tools[@]}"; do
        case $tool in hydrafy|baseline|floor|skopeo+umoci|curl+tar) ;; *) echo "unknown tool $tool" >&2; exit 2 ;; esac
    done
    case " ${tools[*]} " in *" floor "*) inflate_layers "$img" ;; esac
    echo "letting ext4 forget recent deletions" >&2; sync; sleep 65
    # One untimed round first (the registry's files into the page cache),
    # then the timed rounds, each starting with the next tool in turn.
    for tool in "${tools[@]}"; do run_one "$img" "$tool" warmup; done
    sed -i '/\twarmup$/d' "$results"
    for r in $(seq "$runs"); do
        for k in $(seq 0 $(( ${#tools[@]} - 1 ))); do
            run_one "$img" "${tools[$(( (r + k) % ${#tools[@]} ))]}" "$r"
        done
        echo "$img run $r/$runs done" >&2
    done
    rm -rf "$work/out" "$work/inflated"; sync
done

python3 - "$results" "$(nproc)" "$(sed -n 's/^model name\s*: //p' /proc/cpuinfo | head -1)" <<'PY'
import collections, statistics, sys
rows = [l.split("\t") for l in open(sys.argv[1]).read().split("\n") if l]
t = collections.defaultdict(list); m = collections.defaultdict(list)
for img, tool, secs, kb, _run in rows:
    t[img, tool].append(float(secs)); m[img, tool].append(int(kb))
imgs = list(dict.fromkeys(r[0] for r in rows))
print(f"machine: {sys.argv[2]} cores, {sys.argv[3]}; {len(t[imgs[0], 'hydrafy'])} alternating runs per tool")
print()
names = {"hydrafy": "hydrafy fetch", "floor": "floor (tar -xf)", "skopeo+umoci": "skopeo + umoci",
         "curl+tar": "curl \\| tar -xz", "baseline": "baseline fetch"}
peers = [k for k in ("floor", "skopeo+umoci", "curl+tar", "baseline") if any((i, k) in t for i in imgs)]
med = lambda img, k: statistics.median(t[img, k]) if (img, k) in t else None
cols = ["hydrafy fetch"] + [names[k] for k in peers] + ["hydrafy / " + names[k] for k in peers] + ["hydrafy peak RSS"]
print("| image | " + " | ".join(cols) + " |")
print("|---" * (len(cols) + 1) + "|")
for img in imgs:
    h = med(img, "hydrafy")
    cells = [f"{h:.2f} s"]
    cells += [f"{med(img, k):.2f} s" if med(img, k) else "-" for k in peers]
    cells += [f"{h / med(img, k):.2f}" if med(img, k) else "-" for k in peers]
    cells.append(f"{max(m[img, 'hydrafy']) / 1024:.0f} MB")
    print(f"| {img} | " + " | ".join(cells) + " |")
PY
