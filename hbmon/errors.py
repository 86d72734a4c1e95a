"""The one exception hierarchy of hbmon.

Every message names the offending value and says what to do about it.  The CLI maps
:class:`ConfigError` and :class:`UsageError` to exit code 2 and any other
:class:`HbmonError` to exit code 1.
"""

from __future__ import annotations


class HbmonError(Exception):
    """Base of every error hbmon raises on purpose."""

    exit_code = 1


class UsageError(HbmonError):
    """The command line asks for something that cannot be done as asked."""

    exit_code = 2


class ConfigError(HbmonError):
    """A configuration file is invalid; the message names the file and the key."""

    exit_code = 2

    def __init__(self, source: str, key: str, problem: str) -> None:
        self.source = source
        self.key = key
        self.problem = problem
        super().__init__(f"{source}: {key}: {problem}")


class VolumeError(HbmonError):
    """A heartbeat volume cannot be read or written as needed."""

    def __init__(self, path: str, problem: str, reason: str = "io_error") -> None:
        self.path = path
        self.problem = problem
        self.reason = reason
        super().__init__(f"{path}: {problem}")


class RecordError(HbmonError):
    """A heartbeat slot does not hold a valid record for the expected pair.

    ``reason`` is one of :data:`hbmon.record.REASONS`; it becomes the ``reason`` label
    of ``hbmon_volume_read_errors_total``.
    """

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}")


class SlotTakenError(VolumeError):
    """A slot holds another pair's record or foreign data; hbmon will not overwrite it."""

    def __init__(self, path: str, slot: int, holder: str) -> None:
        super().__init__(
            path,
            f"slot {slot} holds {holder}; refusing to overwrite it "
            "(check the volume and slot in the configuration, or use "
            "`hbmon volume init --force` if the data is known to be disposable)",
            reason="slot_taken",
        )
        self.slot = slot


class ArbiterError(HbmonError):
    """The arbiter (etcd) could not give the answer a decision needs."""


class ArbiterUnavailable(ArbiterError):
    """No arbiter endpoint answered in time, or its answer was not one hbmon understands.

    Never read as "no": a caller that could not ask knows nothing and must act as
    the losing side would (demote as its lease runs out, refuse a failover)."""


class LeaseLost(ArbiterError):
    """The arbiter says this site's lease no longer exists (expired or revoked)."""


class OwnerTaken(ArbiterError):
    """A pair's owner key is held by someone else than the caller expected."""

    def __init__(self, pair: str, holder: str, term: int | None) -> None:
        self.pair = pair
        self.holder = holder
        self.term = term
        at = f" at term {term}" if term is not None else ""
        super().__init__(f"pair {pair!r} is owned by {holder}{at}")
