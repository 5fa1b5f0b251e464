"""kvtop's screen as plain data: lines of (text, style) pieces for a given width and height, no curses here.

Per instance two lines: name, state, pid, device and a bar ('|' used, ':' premapped, blank free, up to its limit),
then "Prealloc X | Used Y / Limit Z (P%) | Free F": one device's figures, followed by "| x2 devices: Used T" for a
tensor-parallel instance. A device bar per GPU (NVML) or for the host, with the KV kvcached instances have mapped
there. Instances that do not fit the height are counted on the last line. Styles: title, used, prealloc, over, dead,
dim, normal.
"""

from __future__ import annotations

from typing import Sequence

from ..devices import devices_label
from ..registry import InstanceRecord
from ..units import format_size
from .devices import DeviceMemory

Line = list[tuple[str, str]]

_STATE = {"alive": "alive", "dead": "DEAD", "foreign": "foreign", "invalid": "invalid"}


def bar(width: int, scale: int, used: int, prealloc: int = 0) -> Line:
    """`[|||:::   ]` of `width` characters: used, then premapped, then free, against `scale` bytes."""
    inner = max(0, width - 2)
    if inner == 0:
        return []
    scale = scale if scale > 0 else max(used + prealloc, 1)
    used_cells = min(inner, round(inner * used / scale))
    mapped_cells = min(inner, round(inner * (used + prealloc) / scale))
    over = used > scale
    pieces = [("[", "normal"), ("|" * used_cells, "over" if over else "used"),
              (":" * (mapped_cells - used_cells), "prealloc"), (" " * (inner - mapped_cells), "normal"),
              ("]", "normal")]
    return [p for p in pieces if p[0]]


def device_line(device: DeviceMemory, width: int) -> Line:
    label = f"{device.label[:20]:<20} "
    if device.error:
        return [(label, "title"), (device.error, "dim")]
    pct = 100 * device.used / device.total if device.total else 0
    text = f" {format_size(device.used)}/{format_size(device.total)} ({pct:.0f}%)"
    if device.kv:
        text += f" KV {format_size(device.kv)}"
    return [(label, "title")] + bar(width - len(label) - len(text), device.total, device.used) + [(text, "normal")]


def usage_text(r: InstanceRecord) -> str:
    pct = f"{100 * r.used_bytes / r.limit_bytes:.0f}%" if r.limit_bytes else "-"
    text = (f"Prealloc {format_size(r.premapped_bytes)} | Used {format_size(r.used_bytes)} / "
            f"Limit {format_size(r.limit_bytes)} ({pct}) | Free {format_size(r.free_bytes)}")
    if r.deficit_bytes:
        text += f" | over by {format_size(r.deficit_bytes)}"
    if r.num_devices > 1:
        text += f" | x{r.num_devices} devices: Used {format_size(r.total_used_bytes)}"
    return text


def short_devices(r: InstanceRecord, width: int = 7) -> str:
    """The device column: "cuda:0", "cpu x2", "cuda:0,1", or "cuda x4" where the list is wider than `width`."""
    label = devices_label(r.devices)
    if len(label) <= width or r.num_devices < 2:
        return label
    return f"{r.backend if r.backend != 'host' else 'cpu'} x{r.num_devices}"


def instance_lines(r: InstanceRecord, width: int) -> list[Line]:
    state = _STATE.get(r.status, r.status)
    state_style = "normal" if r.alive else "dead"
    head = [(f"{r.name[:20]:<20} ", "title"), (f"{state:<7} ", state_style)]
    if r.status in ("foreign", "invalid"):
        return [head, [("  " + r.reason, "dim")]]
    head.append((f"{r.pid:>7} {short_devices(r)[:7]:<7} ", "normal"))
    used = len(head[0][0]) + len(head[1][0]) + len(head[2][0])
    pieces = bar(width - used, r.limit_bytes, r.used_bytes, r.premapped_bytes)
    if not r.alive:
        pieces = [(text, "dim") for text, _ in pieces]
    return [head + pieces, [("  " + usage_text(r), "normal" if r.alive else "dim")]]


def render(records: Sequence[InstanceRecord], devices: Sequence[DeviceMemory], width: int, height: int,
           refresh_s: float, clock: str = "") -> list[Line]:
    """The whole screen, at most `height` lines of at most `width` characters."""
    title = f"kvtop  {len(records)} instance(s)  every {refresh_s:g}s  |used :prealloc  q: quit"
    gap = max(1, width - len(title) - len(clock))
    lines: list[Line] = [[(title + " " * gap + clock, "title")]]
    lines += [device_line(d, width) for d in devices]
    lines.append([])
    if not records:
        lines.append([("no kvcached instances", "dim")])
    for i, r in enumerate(records):
        left = len(records) - i
        room = height - len(lines)
        if room < 2 or (room < 3 and left > 1):
            lines.append([(f"... {left} more instance(s): enlarge the window", "dim")])
            break
        lines += instance_lines(r, width)
    return [clip(line, width) for line in lines[:height]]


def clip(line: Line, width: int) -> Line:
    out, room = [], width
    for text, style in line:
        if room <= 0:
            break
        out.append((text[:room], style))
        room -= len(text[:room])
    return out


def plain(lines: list[Line]) -> str:
    return "\n".join("".join(text for text, _ in line).rstrip() for line in lines)
