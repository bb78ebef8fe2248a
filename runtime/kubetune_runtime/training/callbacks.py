"""TrainerCallbacks shared by the recipes: progress, NaN guard, graceful stop on SIGTERM.

Each is a small ``transformers.TrainerCallback``; the recipes add them explicitly.
"""

from __future__ import annotations

import math
import signal
import threading
import time
from types import FrameType
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from kubetune_runtime.errors import TrainingFailed
from kubetune_runtime.progress import ProgressReporter, ProgressUpdate


class ProgressCallback(TrainerCallback):
    """Reports step, loss, eval loss, non-padding tokens/s and ETA at every log (rank 0 only).

    tokens/s is the change of ``state.num_input_tokens_seen`` (non-padding tokens gathered
    from every process) over wall time since the previous log; ETA extrapolates the mean
    step time of this session.
    """

    def __init__(self, reporter: ProgressReporter, *, enabled: bool) -> None:
        self._reporter = reporter
        self._enabled = enabled
        self._start: float | None = None
        self._start_step = 0
        self._last: tuple[float, int] | None = None
        self.history: list[dict[str, float]] = []

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **_: Any
    ) -> None:
        """Start the clocks (a resumed run starts at its checkpoint's step)."""
        now = time.monotonic()
        self._start = now
        self._start_step = state.global_step
        self._last = (now, state.num_input_tokens_seen or 0)

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **_: Any,
    ) -> None:
        """Turn the Trainer's log record into a progress update."""
        logs = logs or {}
        self.history.append({"step": state.global_step, **logs})
        if not self._enabled or self._start is None or self._last is None:
            return
        now = time.monotonic()
        tokens = state.num_input_tokens_seen or 0
        last_time, last_tokens = self._last
        tps = (tokens - last_tokens) / (now - last_time) if now > last_time else None
        if "loss" in logs:  # eval logs do not advance the token counter
            self._last = (now, tokens)
        done = state.global_step - self._start_step
        eta = None
        if done > 0 and state.max_steps:
            eta = int((now - self._start) / done * max(0, state.max_steps - state.global_step))
        self._reporter.report(
            ProgressUpdate(
                step=state.global_step,
                total_steps=state.max_steps or None,
                epoch=state.epoch,
                loss=logs.get("loss"),
                eval_loss=logs.get("eval_loss"),
                learning_rate=logs.get("learning_rate"),
                tokens_per_second=tps if "loss" in logs else None,
                eta_seconds=eta,
            )
        )


class NonFiniteLossGuard(TrainerCallback):
    """Aborts the run with TrainingFailed as soon as a logged loss is NaN or infinite.

    Needs ``logging_nan_inf_filter=False`` (set by ``training_arguments``): with the default
    the Trainer silently replaces non-finite losses by the running mean.
    """

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **_: Any,
    ) -> None:
        """Raise on a non-finite ``loss`` or ``eval_loss``."""
        for key in ("loss", "eval_loss"):
            value = (logs or {}).get(key)
            if value is not None and not math.isfinite(value):
                raise TrainingFailed(
                    f"{key} became {value} at step {state.global_step}; lower the learning "
                    "rate or check the data (no checkpoint of this state is kept)"
                )


class GracefulStop(TrainerCallback):
    """On SIGTERM (pod preemption, eviction, deletion) or SIGINT (Ctrl-C): checkpoint, then stop.

    The handler only sets a flag; at the end of the current optimizer step the callback asks
    the Trainer to save and stop, so the checkpoint is consistent. Kubernetes waits
    ``terminationGracePeriodSeconds`` after SIGTERM; set it above one step plus one save.
    """

    def __init__(self) -> None:
        self.stop_requested: str | None = None
        self._previous: dict[int, Any] = {}

    def requested(self) -> str | None:
        """The signal's name (SIGTERM, SIGINT) once one arrived, else None."""
        return self.stop_requested

    def install(self) -> None:
        """Install the handlers (main thread only; a no-op elsewhere)."""
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        """Restore the previous handlers."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.stop_requested = signal.Signals(signum).name

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **_: Any
    ) -> None:
        """Turn a pending signal into save-and-stop at this step boundary.

        In a multi-process run every rank must stop at the same step, so the flag is
        all-reduced (a one-element MAX per step; the signal reaches ranks at different times).
        """
        if _any_rank(self.stop_requested is not None):
            control.should_save = True
            control.should_training_stop = True


def _any_rank(flag: bool) -> bool:
    import torch  # noqa: PLC0415
    import torch.distributed as dist  # noqa: PLC0415

    if not (dist.is_available() and dist.is_initialized()):
        return flag
    device = (
        torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
    )
    tensor = torch.tensor([1 if flag else 0], device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item())
