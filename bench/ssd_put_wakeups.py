"""Why a single SSD put's first bytes reach the daemon late: the scheduler's view (issue 9, 9s2).

Reads one run of ``bench/ssd_put_profile.py`` (its client and daemon event files, which
carry the client's and the serving daemon thread's ids) and a system-wide ``perf`` record
of the same run taken with CLOCK_MONOTONIC (the clock of the profile's timestamps), and
prints, per put: when the client's first skb went out on the loopback (``net:netif_rx``),
when the daemon's connection thread was woken and on which CPU, how long it then waited to
run, and whom it replaced on that CPU. Then the counts and the median.

    perf record -k CLOCK_MONOTONIC -a -e sched:sched_switch,sched:sched_wakeup,net:netif_rx \\
        -o /tmp/ssd.perf -- .venv/bin/python bench/ssd_put_profile.py --rounds 1 --puts 25 \\
        --dir /var/tmp/ssd-prof
    perf script -i /tmp/ssd.perf -F comm,tid,cpu,time,event,trace > /tmp/ssd.perf.txt
    .venv/bin/python bench/ssd_put_wakeups.py /var/tmp/ssd-prof/events-1-<tree> /tmp/ssd.perf.txt
"""

from __future__ import annotations

import bisect
import json
import re
import statistics
import sys

_LINE = re.compile(r"^\s*(\S+)\s+(\d+)\s+\[(\d+)\]\s+([\d.]+):\s+(\S+):\s+(.*)$")


def _perf_events(path: str) -> list[tuple[int, int, int, str, str]]:
    """(time ns, tid, cpu, event name, its fields) of each line of ``perf script``."""
    events = []
    with open(path) as lines:
        for line in lines:
            match = _LINE.match(line)
            if match:
                _, tid, cpu, seconds, name, rest = match.groups()
                events.append((int(round(float(seconds) * 1e9)), int(tid), int(cpu),
                               name.rsplit(":", 1)[-1], rest))
    events.sort()
    return events


def main() -> int:
    if len(sys.argv) != 3:
        print(__doc__)
        return 2
    prefix, perf_text = sys.argv[1:]
    client = json.load(open(prefix + ".client.json"))
    daemon = json.load(open(prefix + ".daemon.json"))
    client_tid = next(value for _, label, value in client if label == "client.tid")
    events = _perf_events(perf_text)
    times = [event[0] for event in events]
    rows = []
    for start, label, duration in client:
        if label != "put":
            continue
        sends = [s for s, step, _ in client
                 if step == "data_frames.sendmsg_all" and start <= s <= start + duration]
        heads = [(s, tid) for s, step, tid in daemon
                 if step == "header.tid" and start <= s <= start + duration]
        if not sends or not heads:
            continue
        send, (header, daemon_tid) = min(sends), min(heads)
        first_tx = wake = running = None
        on_waker_cpu, replaced = False, ""
        for at, tid, cpu, name, rest in events[bisect.bisect_left(times, send):
                                               bisect.bisect_right(times, header)]:
            if name == "netif_rx" and tid == client_tid and first_tx is None:
                first_tx = at
            elif name == "sched_wakeup" and f" pid={daemon_tid} " in f" {rest}" \
                    and wake is None:
                wake, on_waker_cpu = at, int(rest.rsplit("target_cpu=", 1)[1]) == cpu
            elif name == "sched_switch" and f"next_pid={daemon_tid} " in rest \
                    and wake is not None and running is None:
                running = at
                replaced = "the client" if f"prev_pid={client_tid} " in rest else \
                    rest.split("prev_comm=", 1)[1].split()[0]
        if wake is None or running is None:
            continue
        rows.append(((header - send) / 1e6, ((first_tx or send) - send) / 1e6,
                     (wake - send) / 1e6, on_waker_cpu, (running - wake) / 1e6, replaced))
        print("send -> header %.2f ms: first skb out +%.3f, daemon woken +%.3f (on the "
              "client's CPU: %s), ran %.3f ms later, replacing %s" % rows[-1])
    if not rows:
        print("no put with both a wake-up and a switch-in of the daemon thread recorded")
        return 1
    waits = [row[4] for row in rows]
    print(f"{len(rows)} puts: woken on the client's CPU {sum(r[3] for r in rows)}, ran when "
          f"the client was switched out {sum(r[5] == 'the client' for r in rows)}; wake -> "
          f"run median {statistics.median(waits):.3f} ms ({min(waits):.3f}-{max(waits):.3f}); "
          f"send -> header median {statistics.median(r[0] for r in rows):.3f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
