"""Process layout: rank/world from the launcher's environment, DeepSpeed config, relaunch.

A pod runs ``kubetune-runtime train --config run.json``. When the RunConfig asks for more
than one process in total and the process was not started by a launcher, the entry point
re-executes itself under ``torchrun`` with the standard rendezvous environment:

* ``MASTER_ADDR`` / ``MASTER_PORT``: index 0's stable DNS name (headless Service) and port;
* node rank: ``NODE_RANK``, else ``JOB_COMPLETION_INDEX`` (an Indexed Job's pod index);
* nodes and processes per node from the RunConfig.

This is how Kubeflow's PyTorchJob and JobSet wire torchrun; DeepSpeed's own launcher is not
needed because the HF Trainer initialises DeepSpeed from the torchrun environment.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kubetune_runtime.config import DistributedConfig

DEFAULT_MASTER_PORT = 29500


@dataclass(frozen=True)
class ProcessInfo:
    """This process's place in the run: global ``rank`` of ``world_size``, and ``local_rank``."""

    rank: int
    local_rank: int
    world_size: int

    @property
    def is_main(self) -> bool:
        """True on global rank 0, which logs, reports progress and publishes."""
        return self.rank == 0


def process_info(env: Mapping[str, str] = os.environ) -> ProcessInfo:
    """Read rank, local rank and world size as torchrun (or the deepspeed launcher) sets them."""
    return ProcessInfo(
        rank=int(env.get("RANK", "0")),
        local_rank=int(env.get("LOCAL_RANK", "0")),
        world_size=int(env.get("WORLD_SIZE", "1")),
    )


def needs_launcher(config: DistributedConfig, env: Mapping[str, str] = os.environ) -> bool:
    """True when the run wants several processes and this one was not started by a launcher."""
    return config.nodes * config.processes_per_node > 1 and "LOCAL_RANK" not in env


def torchrun_command(
    config: DistributedConfig,
    argv: Sequence[str],
    env: Mapping[str, str] = os.environ,
) -> list[str]:
    """The ``torchrun`` command that runs ``argv`` (a ``python -m`` module and its arguments).

    Args:
        config: nodes and processes per node.
        argv: what each worker runs, e.g. ``["-m", "kubetune_runtime.entrypoint", "train",
            "--config", "run.json"]``.
        env: the pod's environment (rendezvous variables, see the module docstring).

    Returns:
        The full command line, starting with the current Python interpreter.

    Raises:
        ValueError: a multi-node run without ``MASTER_ADDR`` or without a node rank.
    """
    node_rank = env.get("NODE_RANK", env.get("JOB_COMPLETION_INDEX"))
    if config.nodes > 1 and ("MASTER_ADDR" not in env or node_rank is None):
        raise ValueError(
            "a multi-node run needs MASTER_ADDR and NODE_RANK (or an Indexed Job's "
            "JOB_COMPLETION_INDEX) in the environment"
        )
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nnodes={config.nodes}",
        f"--nproc-per-node={config.processes_per_node}",
        f"--node-rank={node_rank or 0}",
        f"--master-addr={env.get('MASTER_ADDR', '127.0.0.1')}",
        f"--master-port={env.get('MASTER_PORT', str(DEFAULT_MASTER_PORT))}",
        *argv,
    ]


def deepspeed_config(config: DistributedConfig) -> dict[str, Any] | None:
    """The DeepSpeed JSON for the HF Trainer, generated from the ZeRO settings (never by hand).

    Batch sizes, accumulation, clipping and precision are ``"auto"`` so the Trainer fills them
    from TrainingArguments and the two can never disagree. Returns None without DeepSpeed.
    Reference: DeepSpeed ZeRO (Rajbhandari et al., 2020); transformers' DeepSpeed integration.
    """
    ds = config.deepspeed
    if ds is None:
        return None
    zero: dict[str, Any] = {
        "stage": ds.zero_stage,
        "overlap_comm": False,
        "contiguous_gradients": True,
    }
    if ds.offload_optimizer == "cpu":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    offloading = ds.offload_optimizer == "cpu" or ds.offload_params == "cpu"
    if ds.offload_params == "cpu":
        zero["offload_param"] = {"device": "cpu", "pin_memory": False}
    if ds.zero_stage == 3:
        # Gather the full weights at save time so adapters and models are written whole
        # (without it, ZeRO-3 saves empty shards: a known failure of naive setups).
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return {
        "zero_optimization": zero,
        "bf16": {"enabled": "auto"},
        "fp16": {"enabled": "auto"},
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        # The Trainer passes its own (torch) optimizer; with offload DeepSpeed would otherwise
        # refuse it and demand its JIT-compiled CPU Adam.
        **({"zero_force_ds_cpu_optimizer": False} if offloading else {}),
    }


def configure_cpu_deepspeed(config: DistributedConfig, *, cuda: bool, world_size: int) -> bool:
    """Set up accelerate's process state for DeepSpeed on CPU; True when it did.

    With DeepSpeed, TrainingArguments does not pass a backend to accelerate, which then finds
    no device backend on a CPU-only machine and runs every rank as a world of one (the gathers
    of a multi-process run then fail). Creating the state ourselves with the gloo backend and
    DeepSpeed enabled (DS_ACCELERATOR=cpu) and telling TrainingArguments to use it
    (``accelerator_config.use_configured_state``) gives a real multi-process CPU run; this is
    how CI exercises ZeRO-2/3. GPU runs never take this path.
    """
    if cuda or world_size <= 1 or config.deepspeed is None:
        return False
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from accelerate.state import PartialState  # noqa: PLC0415

    # Kept set for the process: accelerate's AcceleratorState reads it again when the Trainer
    # creates its Accelerator, and only then attaches the DeepSpeed plugin.
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    PartialState(backend="gloo")
    return True
