"""Keep patient data out of Prefect (security review M12): what a flow may show in the UI.

Prefect stores task-run names, artifacts (tables, markdown with inline images) and run logs in its
database and serves them to everyone who holds the server's auth string. Slide file names often
carry accession numbers, heatmap overviews are tissue images, and patient ids are identifiers. When
redaction is on, our flows name task runs by number, replace slide names in artifact tables by
``slide-<n>``, leave images and patient ids out of artifacts and keep every detail in the stage's own
output folder (``summary.md``, ``logfile.log``, the CSVs), which stays on the hospital's storage.

Redaction is on when the flow run carries the tag :data:`REDACT_TAG` — the ``cohort/process``
deployment that INBOX cohorts run through has it, and the cohort flow passes it to every stage — or
when ``STAMP_REDACT_PHI=1`` is set for the worker (IT's switch for a whole node).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

REDACT_TAG = "stamp:redact-phi"
ENV_SWITCH = "STAMP_REDACT_PHI"


def redacting() -> bool:
    """True when this run must keep slide names, patient ids and images out of Prefect."""
    if os.environ.get(ENV_SWITCH, "").strip().lower() in ("1", "true", "yes", "on"):
        return True
    from prefect.context import FlowRunContext, TagsContext

    if REDACT_TAG in TagsContext.get().current_tags:
        return True
    ctx = FlowRunContext.get()
    return bool(ctx and ctx.flow_run and REDACT_TAG in (ctx.flow_run.tags or []))


@contextmanager
def redaction_scope(on: bool) -> Iterator[None]:
    """Within it, runs this process creates (subflows, tasks) carry :data:`REDACT_TAG` when ``on``."""
    from prefect import tags

    with tags(REDACT_TAG) if on else nullcontext():
        yield


def run_label(prefix: str, name: str, number: int) -> str:
    """A task-run name: ``prefix-name``, or ``prefix-<number>`` when redacting."""
    return f"{prefix}-{number}" if redacting() else f"{prefix}-{name}"


def artifact_rows(
    rows: Iterable[dict[str, Any]], name_key: str, hidden: Iterable[str] = ()
) -> list[dict[str, Any]]:
    """Rows for a table artifact: as they are, or numbered, with ``name_key`` and ``hidden`` columns removed."""
    rows = list(rows)
    if not redacting():
        return rows
    drop = {name_key, *hidden}
    return [
        {name_key: f"{name_key}-{i}", **{k: v for k, v in r.items() if k not in drop}}
        for i, r in enumerate(rows, 1)
    ]


def artifact_text(full: str, redacted: str) -> str:
    """``full`` for the artifact, or ``redacted`` when redacting."""
    return redacted if redacting() else full
