"""The adapter agent's decisions, as pure functions over plain values (no I/O, no clock).

The agent (``serving.agent``) observes the engine, calls :func:`plan`, runs the actions it
returns as tasks, and feeds their outcomes back through :func:`on_prepared`,
:func:`on_loaded` and :func:`on_failure`. Time comes in as arguments: ``now`` is a
monotonic clock in seconds (for delays), ``wall`` a UTC datetime (for ``lastTransitionTime``).

Life of one adapter (phases are AdapterStatus's)::

    Pending -> Downloading -> Loading -> Loaded
                   |             |         | the engine no longer lists it (restart): Loading
                   v             v
          (transient: retry with backoff, same phase; after max_attempts:) Failed
          (permanent: digest mismatch, incompatible, engine 4xx:)          Failed

- *prepare* (Downloading) fetches and verifies the artifact and checks compatibility;
  *load* (Loading) asks the engine. Loading waits, without counting attempts, while the
  engine is not up (it may take many minutes to load the base model).
- A changed ``uri`` or ``digest`` starts over from Pending (a running step is cancelled);
  the engine keeps serving the previous version until the new one replaces it, and still
  serves it when the new one fails (like a stalled rollout; status shows the new spec as
  Failed).
- Failed is retried when the adapter's ``uri``/``digest`` or the engine/base-model settings
  (``rules``) change, or after ``failed_retry_seconds``.
- Adapters the engine serves that are not wanted (removed, or beyond ``max_loras``) are
  unloaded.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Literal

from kubetune_runtime.serving.config import AdapterEntry, ReconcileConfig

__all__ = [
    "Action",
    "AdapterState",
    "EngineView",
    "Phase",
    "Plan",
    "admitted",
    "backoff_delay",
    "on_failure",
    "on_loaded",
    "on_prepared",
    "plan",
    "transition",
]

Phase = Literal["Pending", "Blocked", "Downloading", "Loading", "Loaded", "Failed"]
ActionKind = Literal["prepare", "load", "unload", "cancel"]


@dataclass(frozen=True)
class AdapterState:
    """What the agent knows about one wanted adapter.

    Attributes:
        name, uri, digest, pinned: the adapter's spec (from the config).
        phase: where it is (see the module docstring).
        last_error: the last failure, one sentence (kept while retrying; cleared on Loaded).
        load_seconds: storage-to-servable seconds of the last load this agent made.
        last_transition_time: when ``phase`` last changed (UTC).
        attempts: consecutive transient failures of the current step.
        next_attempt_at: monotonic time before which no step starts (backoff).
        failed_at: monotonic time it became Failed.
        permanent: the last Failed was permanent (waiting cannot fix it: digest mismatch,
            incompatible, refused by the engine), not a transient error out of attempts.
        failed_rules: the ``rules`` key in force when it became Failed.
        prepared_path: the verified local copy, once prepared.
        loaded_at: monotonic time this agent saw or made it Loaded.
        busy: a step (prepare or load) is running for it.
        step_started_at: monotonic start of the current bring-up (for ``load_seconds``).
        token: identifies the spec version; outcomes of steps started for an older token
            are ignored.
    """

    name: str
    uri: str
    digest: str
    pinned: bool
    phase: Phase
    last_transition_time: datetime
    token: int
    last_error: str | None = None
    load_seconds: float | None = None
    attempts: int = 0
    next_attempt_at: float = 0.0
    failed_at: float | None = None
    permanent: bool = False
    failed_rules: str | None = None
    prepared_path: str | None = None
    loaded_at: float | None = None
    busy: bool = False
    step_started_at: float | None = None


@dataclass(frozen=True)
class EngineView:
    """One observation of the engine.

    Attributes:
        adapters: adapter name -> the path the engine loaded it from (``None`` when the
            engine does not say).
        observed_at: monotonic time the observation *started* (anything loaded after it
            may be missing from ``adapters``).
    """

    adapters: Mapping[str, str | None]
    observed_at: float


@dataclass(frozen=True)
class Action:
    """A step for the agent to run: prepare/load/cancel a wanted adapter, unload any."""

    kind: ActionKind
    name: str


@dataclass(frozen=True)
class Plan:
    """The states after this decision (wanted adapters only) and the steps to start."""

    states: dict[str, AdapterState]
    actions: list[Action]


def transition(
    state: AdapterState, phase: Phase, wall: datetime, **changes: object
) -> AdapterState:
    """``state`` with ``phase`` and ``changes``; ``last_transition_time`` moves only on change."""
    moved = wall if phase != state.phase else state.last_transition_time
    return replace(state, phase=phase, last_transition_time=moved, **changes)  # type: ignore[arg-type]


def backoff_delay(
    attempt: int,
    policy: ReconcileConfig,
    rand: Callable[[], float] = random.random,
) -> float:
    """Seconds to wait before retry number ``attempt`` (1 = the first retry).

    ``initial * 2**(attempt-1)`` capped at ``backoff_max_seconds``, then shortened by up to
    ``backoff_jitter`` of itself (``rand()`` in [0, 1)); so never above the cap and never
    below ``(1 - jitter) * initial``. With the defaults: about 1, 2, 4, 8, 16, 30, 30 s.
    """
    exponent = min(max(attempt, 1) - 1, 62)
    base = min(policy.backoff_max_seconds, policy.backoff_initial_seconds * 2.0**exponent)
    return base * (1.0 - policy.backoff_jitter * rand())


def admitted(adapters: Sequence[AdapterEntry], max_loras: int | None) -> list[str]:
    """Names that get an engine slot: pinned first, then the rest, each in list order."""
    ordered = [a.name for a in adapters if a.pinned] + [a.name for a in adapters if not a.pinned]
    return ordered if max_loras is None else ordered[:max_loras]


def plan(
    adapters: Sequence[AdapterEntry],
    states: Mapping[str, AdapterState],
    engine: EngineView | None,
    *,
    now: float,
    wall: datetime,
    rules: str,
    policy: ReconcileConfig,
    max_loras: int | None,
    unloading: frozenset[str] = frozenset(),
    next_token: Callable[[], int],
) -> Plan:
    """Decide what to do next: desired adapters vs what the engine serves.

    Args:
        adapters: the wanted adapters (the config's list).
        states: the current state of each adapter the agent tracked so far.
        engine: the latest observation, or ``None`` when the engine is not reachable (then
            nothing is loaded, unloaded or judged lost).
        now: monotonic seconds.
        wall: the current UTC time (for transitions).
        rules: a key of the engine and base-model settings (Failed is retried when it changes).
        policy: retry timing.
        max_loras: engine slots (see :func:`admitted`).
        unloading: names with an unload in flight (not unloaded twice).
        next_token: gives a fresh spec token.

    Returns:
        The new states (exactly the wanted adapters) and the actions to start, in order:
        cancellations first, then unloads, prepares and loads.
    """
    cancels: list[Action] = [
        Action("cancel", name)
        for name, state in states.items()
        if state.busy and name not in {a.name for a in adapters}
    ]
    unloads: list[Action] = []
    steps: list[Action] = []
    slots = set(admitted(adapters, max_loras))
    new_states: dict[str, AdapterState] = {}
    for adapter in adapters:
        state = states.get(adapter.name)
        if state is None or (state.uri, state.digest) != (adapter.uri, adapter.digest):
            if state is not None and state.busy:
                cancels.append(Action("cancel", adapter.name))
            state = AdapterState(
                name=adapter.name,
                uri=adapter.uri,
                digest=adapter.digest,
                pinned=adapter.pinned,
                phase="Pending",
                last_transition_time=wall,
                token=next_token(),
            )
        elif state.pinned != adapter.pinned:
            state = replace(state, pinned=adapter.pinned)
        state, action = _decide(
            state,
            engine,
            now=now,
            wall=wall,
            rules=rules,
            policy=policy,
            admitted=adapter.name in slots,
        )
        new_states[adapter.name] = state
        if action is not None:
            steps.append(action)
    if engine is not None:
        unloads = [
            Action("unload", name)
            for name in sorted(engine.adapters)
            if name not in slots
            and name not in unloading
            and not (name in new_states and new_states[name].busy)
        ]
    return Plan(states=new_states, actions=[*cancels, *unloads, *steps])


def _decide(
    state: AdapterState,
    engine: EngineView | None,
    *,
    now: float,
    wall: datetime,
    rules: str,
    policy: ReconcileConfig,
    admitted: bool,
) -> tuple[AdapterState, Action | None]:
    """The next step for one wanted adapter (see :func:`plan`)."""
    if state.busy:
        return state, None
    if state.phase == "Failed":
        cooled = (
            state.failed_at is not None and now - state.failed_at >= policy.failed_retry_seconds
        )
        if not cooled and state.failed_rules == rules:
            return state, None
        state = transition(
            state,
            "Pending",
            wall,
            attempts=0,
            next_attempt_at=0.0,
            failed_at=None,
            failed_rules=None,
            prepared_path=None,
        )
    if not admitted:
        waiting = "waiting for a free adapter slot (engine.max_loras are all taken)"
        return transition(state, "Pending", wall, last_error=waiting, loaded_at=None), None
    if now < state.next_attempt_at:
        return state, None
    if state.prepared_path is None:
        started = state.step_started_at if state.attempts and state.step_started_at else now
        state = transition(state, "Downloading", wall, busy=True, step_started_at=started)
        return state, Action("prepare", state.name)
    if engine is None:
        return state, None  # the engine is not up: wait, without spending attempts
    if state.name in engine.adapters:
        served = engine.adapters[state.name]
        # An engine that does not report paths is trusted for what this agent loaded itself.
        current = served == state.prepared_path if served is not None else state.phase == "Loaded"
        if current:
            if state.phase != "Loaded":  # e.g. loaded by this agent before it restarted
                state = transition(
                    state, "Loaded", wall, last_error=None, attempts=0, loaded_at=now
                )
            return state, None
    if state.phase == "Loaded":
        if state.loaded_at is not None and state.loaded_at >= engine.observed_at:
            return state, None  # loaded after this observation started: not lost
        reason = (
            "the engine no longer serves it (restarted?); reloading"
            if state.name not in engine.adapters
            else "the engine serves another copy under this name; reloading"
        )
        state = transition(
            state, "Loading", wall, busy=True, last_error=reason, attempts=0, step_started_at=now
        )
        return state, Action("load", state.name)
    started = state.step_started_at if state.step_started_at is not None else now
    state = transition(state, "Loading", wall, busy=True, step_started_at=started)
    return state, Action("load", state.name)


def on_prepared(state: AdapterState, path: str, *, wall: datetime) -> AdapterState:
    """A prepare step verified and checked the artifact at ``path``: next, load it."""
    return transition(
        state,
        "Loading",
        wall,
        prepared_path=path,
        busy=False,
        attempts=0,
        last_error=None,
        next_attempt_at=0.0,
    )


def on_loaded(state: AdapterState, *, now: float, wall: datetime) -> AdapterState:
    """The engine accepted the adapter; ``load_seconds`` runs from the bring-up's start."""
    started = state.step_started_at if state.step_started_at is not None else now
    return transition(
        state,
        "Loaded",
        wall,
        busy=False,
        attempts=0,
        last_error=None,
        next_attempt_at=0.0,
        load_seconds=round(now - started, 3),
        loaded_at=now,
        step_started_at=None,
    )


def on_failure(
    state: AdapterState,
    error: str,
    *,
    permanent: bool,
    now: float,
    wall: datetime,
    rules: str,
    policy: ReconcileConfig,
    rand: Callable[[], float] = random.random,
) -> AdapterState:
    """A step failed: Failed at once when permanent or out of attempts, else retry later.

    ``last_error`` says what failed; while retrying it adds ``(attempt n/max, retrying in
    Xs)``, and the final one ``(gave up after n attempts)``.
    """
    attempts = state.attempts + 1
    if permanent or attempts >= policy.max_attempts:
        suffix = "" if permanent else f" (gave up after {attempts} attempts)"
        return transition(
            state,
            "Failed",
            wall,
            busy=False,
            last_error=error + suffix,
            attempts=attempts,
            failed_at=now,
            permanent=permanent,
            failed_rules=rules,
            step_started_at=None,
            loaded_at=None,
        )
    delay = backoff_delay(attempts, policy, rand)
    return replace(
        state,
        busy=False,
        attempts=attempts,
        next_attempt_at=now + delay,
        last_error=f"{error} (attempt {attempts}/{policy.max_attempts}, retrying in {delay:.1f}s)",
    )
