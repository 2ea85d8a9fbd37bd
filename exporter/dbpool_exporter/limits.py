"""Size caps on the files the exporter reads (config, web config, certificates, DSN files)."""

from __future__ import annotations

# Far above any real file, far below what would take the daemon's memory or minutes of YAML parsing:
# a 1 MiB config parses in about a second; /dev/zero or a mistyped path to a log file stops here.
MAX_CONFIG_BYTES = 1 << 20
MAX_WEB_CONFIG_BYTES = 1 << 20  # also each certificate, key and CA file it names
MAX_DSN_BYTES = 64 << 10


class TooLarge(ValueError):
    """The file holds more than its cap; ``str()`` says so in a few words."""


def read_capped(path: str, limit: int) -> bytes:
    """The file's bytes; ``TooLarge`` past ``limit`` (an endless device or pipe included), else ``OSError``."""
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise TooLarge(f"larger than {_size(limit)}; is this the right file?")
    return data


def _size(n: int) -> str:
    return f"{n >> 20} MiB" if n >= 1 << 20 else f"{n >> 10} KiB"
