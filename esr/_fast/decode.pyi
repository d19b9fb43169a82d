# Types of esr/_fast/decode.pyx, for mypy and readers.
from collections.abc import Iterable

from esr import schema

BUFFERS: tuple[str, ...]

class Taken:
    payload: memoryview
    first_ei: int
    count: int
    lines: memoryview
    records: list[int]
    @property
    def last_ei(self) -> int: ...

class SessionEvents:
    next_ei: int
    count: int
    audit_types: int
    audit_failures: int
    interactive: bool
    def __init__(
        self,
        next_ei: int = 1,
        audited_records: Iterable[type[schema.Record]] = (),
        interactive: bool = False,
        format: schema.AuditFormat | None = None,
    ) -> None: ...
    def audit(
        self,
        records: Iterable[type[schema.Record]],
        failures: Iterable[type[schema.Record]] | None = None,
    ) -> None: ...
    def add(self, event: schema.Event) -> None: ...
    def take(self) -> Taken: ...

def encode_record(event: schema.Record, session: int) -> bytes: ...
def decode_batch(
    batch: memoryview | bytes, sessions: dict[int, SessionEvents], time_offset_ns: int
) -> int: ...
