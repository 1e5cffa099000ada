"""Byte ranges of one file of a pinned Hub commit, read with HTTP range requests.

The requests go through huggingface_hub's own HTTP client and headers (`build_hf_headers`,
`http_stream_backoff`, `hf_raise_for_status`), at the pinned commit's `hf_hub_url`, so tokens,
HF_ENDPOINT, proxies and HF_HUB_OFFLINE behave as for every other file; its errors are mapped by
`hub.hub_errors`. A response is trusted only if it is a 206 for exactly the bytes asked for, and
only once all of them arrived: a short or ignored range is an error, never a truncated tensor.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import httpx2
from huggingface_hub import constants, hf_hub_url
from huggingface_hub.utils import build_hf_headers, hf_raise_for_status, http_stream_backoff

from safelora_cli.hub import HubError, PinnedRepo, Tally, hub_errors, unreachable

_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")
_CHUNK = 1 << 20
_FULL_HINT = "Retry later; if it persists, set SAFELORA_HUB_DOWNLOAD=full to download whole files instead."


def _short(repo: PinnedRepo, filename: str, start: int, stop: int, got: int) -> HubError:
    return HubError(f"The Hub sent {got} of the {stop - start} bytes asked for (bytes {start}-{stop - 1}) of "
                    f"{filename} in the {repo.label} repository {repo.repo_id}; nothing was kept.", hint=_FULL_HINT)


def _check_partial(response: httpx2.Response, repo: PinnedRepo, filename: str, start: int, stop: int) -> int | None:
    """The file's total size from a 206's Content-Range (None if the server does not say), after
    checking that the range is the one asked for."""
    if response.status_code != 206:
        raise HubError(f"The Hub answered HTTP {response.status_code} instead of 206 (partial content) to a range "
                       f"request for {filename} in the {repo.label} repository {repo.repo_id}: the server or a proxy "
                       "does not serve byte ranges.",
                       hint="Set SAFELORA_HUB_DOWNLOAD=full to download whole files instead.")
    match = _CONTENT_RANGE.match(response.headers.get("Content-Range", ""))
    if match is None or (int(match[1]), int(match[2]) + 1) != (start, stop):
        answered = f"bytes {match[1]}-{match[2]}" if match else "no Content-Range"
        raise HubError(f"The Hub answered {answered} for {filename} in the {repo.label} repository {repo.repo_id} "
                       f"when bytes {start}-{stop - 1} were asked for; nothing was kept.", hint=_FULL_HINT)
    return None if match[3] == "*" else int(match[3])


def read_range(repo: PinnedRepo, filename: str, start: int, stop: int, sink: Callable[[int, bytes], None],
               tally: Tally) -> int | None:
    """Bytes `start:stop` of `filename` at the pinned commit, handed to `sink(offset, chunk)` in order.

    Returns the file's total size when the server states it. Every byte received is added to
    `tally`, also when the response is then refused.

    Raises:
        HubError: offline, the Hub failing, the range ignored or answered short.
    """
    if constants.is_offline_mode():
        raise unreachable(repo.label, repo.repo_id, f"tensors of {filename}")
    url = hf_hub_url(repo.repo_id, filename, revision=repo.commit)
    headers = {**build_hf_headers(token=repo.token), "Range": f"bytes={start}-{stop - 1}",
               "Accept-Encoding": "identity"}
    got = 0
    with hub_errors(repo.label, repo.repo_id, repo.revision, f"file {filename}"), http_stream_backoff(
            "GET", url, headers=headers, timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT) as response:
        hf_raise_for_status(response)
        total = _check_partial(response, repo, filename, start, stop)
        try:
            for chunk in response.iter_bytes(chunk_size=_CHUNK):
                tally.bytes += len(chunk)
                if got + len(chunk) > stop - start:
                    raise _short(repo, filename, start, stop, got + len(chunk))  # longer than asked: also refused
                sink(start + got, chunk)
                got += len(chunk)
        except (httpx2.RemoteProtocolError, httpx2.ReadError, httpx2.ReadTimeout):
            pass  # the connection ended early: reported as a short read below
    if got != stop - start:
        raise _short(repo, filename, start, stop, got)
    return total
