"""Command line: ``python -m zcbuf {bench,ls,gc,unlink}`` (also the ``zcbuf`` script)."""

from __future__ import annotations

import os
import sys
from typing import Optional, Sequence

USAGE = """usage: python -m zcbuf COMMAND [options]

commands:
  bench   copy versus zero-copy benchmark: table, results.json/.csv and a plot
  ls      list zcbuf shared-memory segments (size, dtype/shape, held by which pids, age)
  gc      remove segments no process maps any more (not persistent ones); says why
  unlink  remove the named segments now, held or not, persistent or not

options: -h/--help (also after a command), -V/--version
"""


def _ls() -> int:
    from . import ls
    from .bench import fmt_size

    segs = ls()
    if not segs:
        print("no zcbuf segments in /dev/shm")
        return 0
    print(f"{'name':<42} {'size':>10} {'dtype':<10} {'shape':<16} {'held by':<20} {'age':>8}")
    for s in segs:
        shape = "x".join(map(str, s.shape)) if s.shape is not None else "-"
        age = f"{s.age:.0f}s" if s.created else "?"
        dtype = (s.dtype or "raw")[:10]
        if s.holders:
            who = "pid " + ",".join(map(str, s.holders))
        else:
            who = "yes (pid unknown)" if s.held else "nobody"
        flags = (" persistent" if s.persistent else "") + (" sealed" if s.sealed else "")
        c = s.channel
        if c is not None:
            dtype = c.dtype[:10]
            shape = "x".join(map(str, c.shape)) or "()"
            flags += " channel"
        print(f"{s.name:<42} {fmt_size(s.nbytes):>10} {dtype:<10} {shape:<16} {who:<20} {age:>8}{flags}"
              + (f"  ! {s.problem}" if s.problem else ""))
        if c is not None:
            state = "closed" if c.closed else ("alive" if c.publisher_alive else "dead")
            print(f"    {c.policy}, {c.slots} slots, {c.published} published; publisher pid "
                  f"{c.publisher_pid} ({state}); {len(c.subscribers)} subscriber(s)")
            for pid, pos, missed, alive in c.subscribers:
                extra = f", missed {missed}" if missed else ""
                print(f"      pid {pid}: at {pos} ({c.published - pos} waiting{extra})"
                      + ("" if alive else " dead"))
    return 0


def _unlink(names: Sequence[str]) -> int:
    from . import Error, unlink

    rc = 0
    for n in names:
        try:
            unlink(n)
            print(f"removed {n}")
        except Error as e:
            print(f"python -m zcbuf unlink: {n}: {e}", file=sys.stderr)
            rc = 1
    return rc


def _gc() -> int:
    from . import gc_report
    from .bench import fmt_size

    removed = gc_report()
    for r in removed:
        print(f"removed {r.name} ({fmt_size(r.nbytes)}): {r.reason}")
    print(f"removed {len(removed)} segment(s)", file=sys.stderr)
    return 0


_HELP = {
    "ls": "usage: python -m zcbuf ls\n\nList the zcbuf segments in /dev/shm: size, dtype/shape, which pids hold\nthem (from /proc/locks), age, persistent,\nsealed; and files with a zcbuf-looking name whose header is unusable, with\nthe reason.",
    "unlink": "usage: python -m zcbuf unlink NAME [NAME ...]\n\nRemove these segments' names now, held or not, persistent or not (as\nzcbuf.unlink does): processes that map them keep their memory; nobody can open\nthem by name any more.",
    "gc": "usage: python -m zcbuf gc\n\nRemove the zcbuf segments no process maps any more (left behind by killed\nholders), except those created with persist=True; files without a valid zcbuf\nheader are never touched. Prints each removed segment with its size and why.",
}


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if args else 2
    if args[0] in ("-V", "--version"):
        from . import __version__

        print(f"zcbuf {__version__}")
        return 0
    cmd, rest = args[0], args[1:]
    if cmd == "unlink":
        if not rest or rest[0] in ("-h", "--help"):
            print(_HELP[cmd], file=sys.stdout if rest else sys.stderr)
            return 0 if rest else 2
        return _unlink(rest)
    if cmd in _HELP and rest:
        if rest[0] in ("-h", "--help"):
            print(_HELP[cmd])
            return 0
        print(f"python -m zcbuf {cmd} takes no arguments (got {' '.join(rest)!r})\n\n{_HELP[cmd]}", file=sys.stderr)
        return 2
    if cmd == "bench":
        from .bench import main as bench_main

        try:
            return bench_main(rest)
        except BrokenPipeError:
            # The reader of stdout went away (``| head``): stop quietly, as other tools do.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 141
    if cmd == "ls":
        return _ls()
    if cmd == "gc":
        return _gc()
    print(f"unknown command {cmd!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
