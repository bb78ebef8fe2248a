"""metav1.Condition bookkeeping (pure): set one condition, keep lastTransitionTime honest."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from kubetune_operator.controller.observe import format_time

MAX_MESSAGE = 1024


@dataclass(frozen=True)
class Desired:
    """A condition as the reconciler wants it: type, status, reason token, one sentence."""

    type: str
    status: str
    reason: str
    message: str


def find(conditions: list[dict[str, Any]] | None, kind: str) -> dict[str, Any] | None:
    """The condition of ``kind`` in a status's condition list, or None."""
    for cond in conditions or []:
        if cond.get("type") == kind:
            return cond
    return None


def is_true(conditions: list[dict[str, Any]] | None, kind: str) -> bool:
    """Whether the condition of ``kind`` has status "True"."""
    cond = find(conditions, kind)
    return cond is not None and cond.get("status") == "True"


def merge(
    old: list[dict[str, Any]] | None,
    desired: list[Desired],
    *,
    generation: int | None,
    now: datetime,
    keep: tuple[str, ...] = (),
) -> list[dict[str, Any]]:
    """The new condition list: ``desired`` in order, then old conditions named in ``keep``.

    ``lastTransitionTime`` changes only when a condition's status changes (Kubernetes API
    conventions); reason, message and observedGeneration follow the latest reconcile.
    Messages longer than 1,024 characters are cut.
    """
    out: list[dict[str, Any]] = []
    for want in desired:
        prev = find(old, want.type)
        changed = prev is None or prev.get("status") != want.status
        out.append(
            {
                "type": want.type,
                "status": want.status,
                **({"observedGeneration": generation} if generation is not None else {}),
                "lastTransitionTime": (
                    format_time(now) if changed or prev is None else prev["lastTransitionTime"]
                ),
                "reason": want.reason,
                "message": want.message[:MAX_MESSAGE],
            }
        )
    names = {c["type"] for c in out}
    out += [dict(c) for c in old or [] if c.get("type") in keep and c.get("type") not in names]
    return out
