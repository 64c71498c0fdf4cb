#!/usr/bin/env bash
# Where a cold `hydrafy fetch` spends its time, from perf: how busy the
# cores are, each thread's time on a core, waiting for one and asleep, the
# kernel's writeback threads, and the hottest functions. With --baseline,
# the same for another build, in the same session, so that a change can be
# shown before and after.
#
# It starts a throwaway distribution registry on loopback and pushes one of
# the images scripts/bench.sh times (see scripts/bench-images.sh). Each
# binary first fetches the image once unprofiled (the registry's files into
# the page cache), then once under `perf sched record` and once under `perf
# record` and once under `strace` (the time spent flushing to disk), each
# into a fresh directory with a cold cache. perf adds some
# overhead of its own: for times to quote, use bench.sh.
#
# usage: scripts/profile.sh [--image full|half|big|cuda] [--baseline BIN] [--work DIR]
# needs: perf strace (apt-get install linux-perf strace) and docker-registry curl pigz python3 nix-bin
set -euo pipefail

image=full
baseline=""
work=${TMPDIR:-/tmp}/hydrafy-profile
here=$(cd "$(dirname "$0")/.." && pwd)
while [ $# -gt 0 ]; do
    case $1 in
        --image) image=$2; shift 2 ;;
        --baseline) baseline=$(realpath "$2"); shift 2 ;;
        --work) work=$2; shift 2 ;;
        *) echo "unknown option $1" >&2; exit 2 ;;
    esac
done
# shellcheck source=scripts/bench-common.sh
. "$here/scripts/bench-common.sh"
bench_start profile.sh "linux-perf strace docker-registry curl pigz python3 nix-bin" perf strace docker-registry curl pigz python3 nix-instantiate
# shellcheck source=scripts/bench-images.sh
. "$here/scripts/bench-images.sh"
ref=$(push_image "$image")

fetch() { # binary dir [wrapper...]
    local bin=$1 dir=$2; shift 2
    mkdir -p "$dir"; sync
    "$@" env XDG_CACHE_HOME="$dir/cache" "$bin" fetch --plain-http -q "$reg/$ref" -o "$dir/nix-backup"
}

profile() { # label binary
    local label=$1 bin=$2 at=$work/$1
    fetch "$bin" "$at/warm"
    echo "letting ext4 forget recent deletions" >&2; sync; sleep 65
    local start end
    start=$(date +%s.%N)
    fetch "$bin" "$at/sched" perf sched record -q -o "$at.sched" -- 2>/dev/null
    end=$(date +%s.%N)
    fetch "$bin" "$at/cycles" perf record -q -F 999 -o "$at.cycles" -- 2>/dev/null
    fetch "$bin" "$at/flush" strace -f -qq --seccomp-bpf -T -e trace=fsync,fdatasync,syncfs -o "$at.flush"
    echo "== $label: $bin"
    perf sched timehist -i "$at.sched" 2>/dev/null |
        python3 "$here/scripts/profile-threads.py" "$(python3 -c "print(float('$end') - float('$start'))")" "$(nproc)"
    python3 - "$at.flush" <<'PY'
import re, sys
calls = [(m.group(1), float(m.group(2))) for m in
         (re.search(r"(\w+)\(.*<(\d+\.\d+)>$", l.strip()) for l in open(sys.argv[1])) if m]
for name in ("fdatasync", "fsync", "syncfs"):
    times = [t for n, t in calls if n == name]
    if times:
        print(f"{name:<22} {sum(times):>10.2f} s in {len(times)} calls (strace, another run), longest {max(times):.2f} s")
PY
    echo
    echo "hottest functions (perf record -F 999, share of all samples, 2% and over):"
    perf report -i "$at.cycles" --stdio --no-children --sort comm,sym --percent-limit 2 -q 2>/dev/null |
        sed -e 's/^ *//' -e '/^$/d' | head -20
    echo
}

profile hydrafy "$hydrafy"
[ -n "$baseline" ] && profile baseline "$baseline"
echo "perf data kept in $work (perf report -i $work/hydrafy.cycles)"
