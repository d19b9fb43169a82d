# Types of esr/_fast/decode.pyx, for mypy and readers.
from collections.abc import Iterable

from esr import schema

BUFFERS: tuple[str, ...]

class SessionEvents:
    events: list[schema.Event]
    audited: list[schema.Event]
    next_ei: int
    audit_types: int
    audit_failures: int
    interactive: bool
    def __init__(
        self,
        next_ei: int = 1,
        audited_records: Iterable[type[schema.Record]] = (),
        interactive: bool = False,
    ) -> None: ...
    def audit(
        self,
        records: Iterable[type[schema.Record]],
        failures: Iterable[type[schema.Record]] | None = None,
    ) -> None: ...
    def add(self, event: schema.Event) -> None: ...
    def take(self) -> tuple[list[schema.Event], list[schema.Event], list[int]]: ...

def encode_record(event: schema.Record, session: int) -> bytes: ...
def decode_batch(
    batch: memoryview | bytes, sessions: dict[int, SessionEvents], time_offset_ns: int
) -> int: ...
