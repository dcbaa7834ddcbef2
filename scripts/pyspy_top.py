#!/usr/bin/env python3
"""Summarise a py-spy raw profile (`py-spy record --native -f raw`, as `scripts/bench tls
--py-spy DIR` writes): the event loop thread's busy samples (epoll waits left out), the top
functions by own time and the top Python and OpenSSL frames by inclusive time.
Run: scripts/pyspy_top.py FILE [N] [--thread-marker TEXT]"""

from __future__ import annotations

import argparse
import collections
import re

IDLE = ("epoll_wait", "epoll_pwait")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("file")
    p.add_argument("n", nargs="?", type=int, default=25)
    p.add_argument(
        "--thread-marker",
        default="uvloop/__init__.py",
        help="text found only in the event loop thread's stacks (default: uvloop/__init__.py)",
    )
    args = p.parse_args()
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    busy = idle = 0
    with open(args.file) as f:
        for line in f:
            stack, _, count = line.rstrip().rpartition(" ")
            if args.thread_marker not in stack or not count.isdigit():
                continue
            frames, n = stack.split(";"), int(count)
            if frames[-1].startswith(IDLE):
                idle += n
                continue
            busy += n
            own[re.sub(r":\d+\)", ")", frames[-1])] += n
            for frame in {re.sub(r":\d+\)", ")", f) for f in frames}:
                if ".py" in frame or "libssl" in frame or "libcrypto" in frame:
                    inclusive[frame] += n
    if not busy:
        raise SystemExit(f"{args.file}: no busy samples of the event loop thread")
    print(f"event loop thread: {busy} busy samples, {idle} idle (in epoll)")
    print("own time:")
    for frame, n in own.most_common(args.n):
        print(f"  {100 * n / busy:5.1f}%  {frame}")
    print("inclusive (Python functions, named OpenSSL functions):")
    shown = [(k, v) for k, v in inclusive.most_common() if not re.search(r"^0x[0-9a-f]+ ", k)]
    for frame, n in shown[: args.n]:
        print(f"  {100 * n / busy:5.1f}%  {frame}")


if __name__ == "__main__":
    main()
