"""The one place user errors and signals become 'Error: …' lines and exit codes; bugs keep tracebacks.

Shared by every command. SIGTERM and SIGHUP are raised where the program is, like Ctrl-C, so that
the writers' clean-up (staging directories, created parents) runs on the way out.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator

import typer

from safelora_cli import console
from safelora_cli.errors import SafeLoraError

_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


class _Signalled(BaseException):
    """SIGTERM or SIGHUP, raised where the program is, so that staging is removed on the way out."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _raise_signal(signum: int, _frame: object) -> None:
    raise _Signalled(signum)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """The one place user errors and signals become 'Error: …' lines and exit codes; bugs keep tracebacks."""
    previous = {s: signal.signal(s, _raise_signal) for s in _SIGNALS}
    try:
        yield
    except SafeLoraError as exc:
        console.error(exc.message, exc.hint)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        console.error("Interrupted; nothing was written.")
        raise typer.Exit(130) from None
    except _Signalled as exc:
        console.error(f"Stopped by {signal.Signals(exc.signum).name}; nothing was written.")
        raise typer.Exit(128 + exc.signum) from None
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
