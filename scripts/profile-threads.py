#!/usr/bin/env python3
"""Sum `perf sched timehist` per thread: time on a core, time runnable but
waiting for one, and time asleep (blocked), for hydrafy's threads, the
kernel's writeback threads and everything else; and how busy the cores were.

usage: perf sched timehist -i FILE | profile-threads.py WALL_SECONDS CORES
"""
import collections
import re
import sys

wall, cores = float(sys.argv[1]), int(sys.argv[2])
line_re = re.compile(r"^\s*(\d+\.\d+)\s+\[(\d+)\]\s+(.+?)\s+(\d+\.\d+)\s+(\d+\.\d+)\s+(\d+\.\d+)\s*$")
task_re = re.compile(r"^(.*)\[(\d+)(?:/(\d+))?\]$")

run = collections.Counter()
delay = collections.Counter()
asleep = collections.Counter()
idle = collections.Counter()
pid_of = {}
first = last = None
for line in sys.stdin:
    m = line_re.match(line)
    if not m:
        continue
    at, cpu, task, wait, sch, ran = m.groups()
    at, wait, sch, ran = float(at), float(wait) / 1e3, float(sch) / 1e3, float(ran) / 1e3
    first = at - ran if first is None else first
    last = at
    if task.startswith("<idle>"):
        idle[int(cpu)] += ran
        continue
    t = task_re.match(task)
    if not t:
        continue
    name, tid = t.group(1), int(t.group(2))
    pid_of[tid] = int(t.group(3) or tid)
    key = (name, tid)
    run[key] += ran
    delay[key] += sch
    asleep[key] += max(wait - sch, 0.0)

# The process is the one whose main thread is named after the binary
# (hydrafy, or a baseline's file name, cut to 15 characters).
hydrafy_pids = {tid for (name, tid) in run if name.startswith("hydrafy") and pid_of[tid] == tid}
ours = sorted((k for k in run if pid_of[k[1]] in hydrafy_pids), key=lambda k: -run[k])
kernel = [k for k in run if re.match(r"(kworker|jbd2|flush)", k[0]) and k not in ours]
other = [k for k in run if k not in ours and k not in kernel]
span = (last - first) if first is not None else 0.0
busy = span * cores - sum(idle.values())
print(f"wall {wall:.2f} s under perf; traced {span:.2f} s; cores busy {busy:.2f} of {span * cores:.2f} core-seconds"
      f" ({100 * busy / max(span * cores, 1e-9):.0f}%)")
print(f"{'thread':<22} {'on a core':>10} {'waiting':>10} {'asleep':>10}   (seconds)")
for name, tid in ours:
    if run[name, tid] < 0.005:
        continue
    print(f"{name + '[' + str(tid) + ']':<22} {run[name, tid]:>10.2f} {delay[name, tid]:>10.2f} {asleep[name, tid]:>10.2f}")
print(f"{'hydrafy, all threads':<22} {sum(run[k] for k in ours):>10.2f} {sum(delay[k] for k in ours):>10.2f}")
print(f"{'kernel writeback':<22} {sum(run[k] for k in kernel):>10.2f}   (kworker, jbd2)")
print(f"{'everything else':<22} {sum(run[k] for k in other):>10.2f}")
