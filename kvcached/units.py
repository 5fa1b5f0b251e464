"""Byte sizes as people type them: 512M, 2G, 1.5GiB, 1000000.

K/M/G/T and KiB/MiB/GiB/TiB are binary (as nvidia-smi's MiB); KB/MB/GB/TB are decimal.
"""

import re

_BINARY = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_DECIMAL = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*$")


def parse_size(text: str) -> int:
    """Bytes in `text`; raises ValueError naming the text when it is not a size."""
    match = _SIZE.match(str(text))
    if not match:
        raise ValueError(f"{text!r} is not a size (examples: 512M, 2G, 1.5GiB, 1048576)")
    number, unit = float(match.group(1)), match.group(2).upper()
    if unit.endswith("IB"):
        unit = unit[:-2]
    elif unit == "B":
        unit = ""
    multiplier = _BINARY.get(unit) or _DECIMAL.get(unit)
    if multiplier is None:
        raise ValueError(f"{text!r}: unknown unit {match.group(2)!r} (use K, M, G, T, KiB..TiB, KB..TB)")
    return int(round(number * multiplier))


def format_size(num_bytes: int) -> str:
    """Short human form: 0, 12K, 1.5G (binary units, as nvidia-smi and nvtop print)."""
    sign = "-" if num_bytes < 0 else ""
    value = float(abs(num_bytes))
    for unit in ("", "K", "M", "G", "T"):
        if value < 1024 or unit == "T":
            break
        value /= 1024
    if unit == "":
        return f"{sign}{int(value)}B"
    return f"{sign}{value:.3g}{unit}" if value < 100 else f"{sign}{value:.0f}{unit}"


def ceil_div(a: int, b: int) -> int:
    """a / b rounded up, for positive b (integers only: no float rounding on byte counts)."""
    return -(-a // b)
