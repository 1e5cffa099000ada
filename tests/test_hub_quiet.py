"""`--quiet` from the Hub cache, offline: huggingface_hub's own log lines and warnings stay silent
(the tool reports problems itself), and the cache lookups use only its public API."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import Trio
from test_hub import HUB_ARGS, build_cache

from safelora_cli import hub

ROOT = Path(__file__).resolve().parents[1]


def test_quiet_offline_run_prints_nothing_on_stderr(sharded_trio: Trio, tmp_path: Path) -> None:
    """Offline, resolving a revision through the cache makes huggingface_hub log "Could not reach
    the Hub … Using cached commit hash"; under --quiet nothing may reach stderr."""
    cache = tmp_path / "hub-cache"
    for name, commit in {"base": "1" * 40, "aligned": "2" * 40, "adapter": "3" * 40}.items():
        build_cache(cache, f"org/{name}", getattr(sharded_trio, name), commit)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_ENDPOINT": "http://127.0.0.1:9",
           "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "default"}
    proc = subprocess.run([sys.executable, "-m", "safelora_cli", "inspect", *HUB_ARGS, "--format", "json",
                           "--device", "cpu", "--quiet"], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""


def test_hub_module_uses_no_private_huggingface_hub_name() -> None:
    source = Path(hub.__file__).read_text()
    assert "_CACHED_NO_EXIST" not in source


def test_quiet_silences_library_log_lines_and_warnings_then_restores_them() -> None:
    import logging
    import warnings

    logger = logging.getLogger("huggingface_hub")
    child = logging.getLogger("huggingface_hub.hf_api")  # where "Could not reach the Hub" is logged
    logger.setLevel(logging.INFO)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with hub.quiet():
                assert not child.isEnabledFor(logging.WARNING)
                warnings.warn("from the library", UserWarning, stacklevel=1)
            assert caught == []
        assert logger.level == logging.INFO and child.isEnabledFor(logging.WARNING)
    finally:
        logger.setLevel(logging.NOTSET)
