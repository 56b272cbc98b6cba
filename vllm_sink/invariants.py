"""Debug check: the scheduler's manager and the worker hold the same row of pages.

Both sides apply the same :class:`vllm_sink.policy.RowTransition` to their own copy of a
sequence's row (the manager to the block list it frees from, the worker to its block-table
row). With ``VLLMSINK_CHECK_ROWS=1`` each side records its row after every transition it
applies, keyed by request and by the token count the window start was computed from; where
both sides recorded the same request at the same token count, their rows must agree (on
their common prefix: a side may already hold the pages allocated for the next tokens).
The check needs both sides in one process (the engine core in process,
``VLLM_ENABLE_V1_MULTIPROCESSING=0``, one worker), as in the engine tests; elsewhere the
records are only kept.
"""

from __future__ import annotations

import os

CHECK_ROWS_ENV = "VLLMSINK_CHECK_ROWS"


class RowLog:
    def __init__(self) -> None:
        self.worker: dict[str, dict[int, tuple[int, ...]]] = {}
        self.manager: dict[str, dict[int, tuple[int, ...]]] = {}

    @staticmethod
    def enabled() -> bool:
        return os.environ.get(CHECK_ROWS_ENV) == "1"

    def record_worker(self, request_id: str, tokens: int, row) -> None:
        self.worker.setdefault(request_id, {})[tokens] = tuple(int(b) for b in row)

    def record_manager(self, request_id: str, tokens: int, row) -> None:
        self.manager.setdefault(request_id, {})[tokens] = tuple(int(b) for b in row)

    def mismatches(self) -> tuple[int, list[str]]:
        """(rows compared, descriptions of the rows that disagree)."""
        compared, bad = 0, []
        for rid, rows in self.worker.items():
            theirs = self.manager.get(rid, {})
            for tokens, row in rows.items():
                if tokens not in theirs:
                    continue
                other = theirs[tokens]
                n = min(len(row), len(other))
                compared += 1
                if row[:n] != other[:n]:
                    bad.append(f"{rid} at {tokens} tokens: worker {row} != manager {other}")
        return compared, bad

    def clear(self) -> None:
        self.worker.clear()
        self.manager.clear()


ROW_LOG = RowLog()
