"""Failures with a known cause, and how the command line reports them: an expected
failure (bad config, missing shard, damaged checkpoint, diverged run, dead peer) is one
line on stderr and a documented exit code (README, "When things go wrong"); anything
else keeps its traceback. Imports nothing of dist_ast, so any layer can use it.
"""

from __future__ import annotations

import logging
import os
import sys

log = logging.getLogger("dist_ast")

EXIT_CONFIG = 2
EXIT_DATA = 3
EXIT_CHECKPOINT = 4
EXIT_NONFINITE = 5
EXIT_PEER_LOST = 6


class ExpectedError(Exception):
    """A failure the user can act on; ``exit_code`` is its documented exit status.
    ``same_on_every_rank``: every rank raises it alike, so rank 0 alone reports it."""

    exit_code = 1
    kind = "error"
    same_on_every_rank = False


class ConfigError(ExpectedError, ValueError):
    """A configuration value that cannot run; the message names the key and the fix."""

    exit_code = EXIT_CONFIG
    kind = "config error"
    same_on_every_rank = True


def require(ok: bool, key: str, value: object, allowed: str) -> None:
    """Raise ConfigError ``invalid key=value: allowed`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"invalid {key}={value!r}: {allowed}")


class PeerLostError(ExpectedError):
    """Another rank died or stopped answering within the process-group timeout."""

    exit_code = EXIT_PEER_LOST
    kind = "peer rank lost"


# What gloo, NCCL and the c10d store say when the other end of a collective is gone.
_PEER_MARKERS = (
    "Connection closed by peer",
    "Connection reset by peer",
    "Broken pipe",
    "Timed out waiting",
    "timed out after",
    "Socket Timeout",
    "NCCL communicator was aborted",
    "Watchdog caught collective operation timeout",
)


def as_expected(error: BaseException) -> ExpectedError | None:
    """The expected error behind ``error`` (itself or its cause chain), else None.

    A collective whose peer died surfaces as a plain RuntimeError from gloo (or a
    ``DistError``), sometimes wrapped (DCP's CheckpointException): it becomes a
    :class:`PeerLostError` quoting the backend's message."""
    seen: set[int] = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, ExpectedError):
            return e
        if _is_peer_failure(e):
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            return PeerLostError(
                "a peer rank died or stopped answering (collective failed: "
                f"{first[:300]}). Its own log says why; resume with the same command "
                "(torchrun --max-restarts does it automatically)"
            )
        e = e.__cause__ or e.__context__
    return None


def _is_peer_failure(e: BaseException) -> bool:
    try:
        from torch.distributed import DistError
    except ImportError:  # torch without distributed support
        DistError = ()  # noqa: N806
    if isinstance(e, DistError):
        return True
    return isinstance(e, RuntimeError) and any(m in str(e) for m in _PEER_MARKERS)


def report_and_exit(error: ExpectedError) -> None:
    """One line on stderr (rank 0 alone for errors every rank raises), then exit.

    After a lost peer the process leaves with ``os._exit``: tearing the process group
    down with a dead peer can abort in C++ ("terminate called without an active
    exception") and replace the documented exit code with SIGABRT's."""
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0 or not error.same_on_every_rank:
        where = f" (rank {rank})" if "RANK" in os.environ and not error.same_on_every_rank else ""
        message = " ".join(str(error).split())  # one line, whatever the message holds
        sys.stderr.write(f"dist_ast: {error.kind}{where}: {message}\n")
        sys.stderr.flush()
        log.debug("%s", message)
    if isinstance(error, PeerLostError):
        for handler in logging.getLogger().handlers:
            handler.flush()
        sys.stdout.flush()
        os._exit(error.exit_code)
    sys.exit(error.exit_code)
