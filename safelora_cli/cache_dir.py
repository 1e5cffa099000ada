"""Where safelora keeps what it fetched from the Hub (see docs/inputs.md, "The tensor cache").

Its own module, light to import: `outputs` needs the location to keep every output out of it,
also in runs that never touch the Hub.
"""

from __future__ import annotations

import os
from pathlib import Path

from safelora_cli.errors import expand_user

CACHE_ENV = "SAFELORA_CACHE"


def cache_root() -> Path:
    """Our cache: $SAFELORA_CACHE, else $XDG_CACHE_HOME/safelora (when absolute), else ~/.cache/safelora."""
    configured = os.environ.get(CACHE_ENV)
    if configured:
        return expand_user(configured)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache") / "safelora"
