"""kvtop: a live curses screen of kvcached instances and their devices' memory, like nvtop.

`kvtop [ipc ...] [--refresh SEC]`; `q` quits, the screen is redrawn on resize, and `--once` prints one screen as
text (for scripts, or a terminal without curses). What is drawn comes from render.py; this module reads and paints.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from typing import Optional

from .. import registry
from ..errors import KVCachedError
from ..devices import Nvml
from .devices import device_memory
from .common import OneLineParser, UsageError, positive_float, print_error
from .render import Line, plain, render


def _frame(names: list[str], refresh: float, nvml: Nvml, width: int, height: int) -> list[Line]:
    records = registry.list_instances(names, missing_ok=True)
    return render(records, device_memory(records, nvml), width, height, refresh, time.strftime("%H:%M:%S"))


def run(names: list[str], refresh: float = 1.0, once: bool = False) -> int:
    registry.list_instances(names)  # unknown names are an error now, not an empty screen
    if not once and not (sys.stdout.isatty() and sys.stdin.isatty()):
        raise UsageError("kvtop needs a terminal (use --once to print one screen)")
    nvml = Nvml()
    try:
        if once:
            size = shutil.get_terminal_size((80, 24))
            print(plain(_frame(names, refresh, nvml, size.columns, size.lines)))
        else:
            import curses

            # ncurses takes LINES/COLUMNS over the terminal's real size, also on resize; tmux sets them at start.
            for variable in ("LINES", "COLUMNS"):
                os.environ.pop(variable, None)
            curses.wrapper(_loop, names, refresh, nvml)
    finally:
        nvml.close()
    return 0


def _styles() -> dict[str, int]:
    import curses

    styles = {"title": curses.A_BOLD, "used": curses.A_NORMAL, "prealloc": curses.A_NORMAL, "over": curses.A_BOLD,
              "dead": curses.A_BOLD, "dim": curses.A_DIM, "normal": curses.A_NORMAL}
    if curses.has_colors():
        curses.start_color()
        try:
            curses.use_default_colors()
            background = -1
        except curses.error:
            background = curses.COLOR_BLACK
        for pair, (style, color) in enumerate(
            (("used", curses.COLOR_GREEN), ("prealloc", curses.COLOR_YELLOW), ("over", curses.COLOR_RED),
             ("dead", curses.COLOR_RED)), start=1):
            curses.init_pair(pair, color, background)
            styles[style] |= curses.color_pair(pair)
    return styles


def _loop(stdscr, names: list[str], refresh: float, nvml: Nvml) -> None:
    import curses

    styles = _styles()
    try:
        curses.curs_set(0)
    except curses.error:
        pass
    stdscr.timeout(int(refresh * 1000))
    while True:
        height, width = stdscr.getmaxyx()
        lines = _frame(names, refresh, nvml, width, height)
        stdscr.erase()
        for y, line in enumerate(lines):
            x = 0
            for text, style in line:
                room = width - x - (1 if y == height - 1 else 0)  # the last cell of the screen cannot be written
                if room <= 0:
                    break
                try:
                    stdscr.addnstr(y, x, text, room, styles.get(style, 0))
                except curses.error:
                    pass
                x += min(len(text), room)
        stdscr.refresh()
        key = stdscr.getch()
        if key in (ord("q"), ord("Q")):
            return
        if key == curses.KEY_RESIZE:
            curses.update_lines_cols()


def main(argv: Optional[list[str]] = None) -> int:
    parser = OneLineParser(prog="kvtop", description="Live view of kvcached instances: per instance a bar of "
                           "premapped, used and free memory up to its limit, and a memory bar per device (NVML for "
                           "GPUs). q quits.")
    parser.add_argument("ipc", nargs="*", help="instance names (default: all)")
    parser.add_argument("--refresh", type=positive_float, default=1.0, metavar="SEC",
                        help="seconds between updates (default 1)")
    parser.add_argument("--once", action="store_true", help="print one screen as text and exit")
    try:
        args = parser.parse_args(sys.argv[1:] if argv is None else argv)
        return run(args.ipc, args.refresh, args.once)
    except KeyboardInterrupt:
        return 0
    except UsageError as exc:
        print_error("kvtop: error: ", exc)
        return 2
    except (KVCachedError, ValueError, OSError) as exc:
        print_error("kvtop: error: ", exc)
        return 1


if __name__ == "__main__":
    sys.exit(main())
