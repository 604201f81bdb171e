"""What the code that owns an Accelerate process group does before and after it.

``accelerate launch`` starts one process per rank; the first ``Accelerator`` joins them into a
process group (gloo on the CPU, NCCL on GPUs).  Two things about that group are ours to handle:
modules that keep references to it must be imported before it exists, and the process that owns
a run tears it down at the very end.  Training and latent caching share both.
"""

from __future__ import annotations

import importlib


def before_process_group() -> None:
    """Import torch._dynamo now, before the process group exists.

    Imported after ``init_process_group`` (the first optimizer or a diffusers model imports it),
    it keeps references to the group that ``destroy_process_group`` cannot drop, so the group's
    worker threads outlive :func:`shutdown_distributed`.
    """
    importlib.import_module("torch._dynamo")


def shutdown_distributed() -> None:
    """Tear down the process group that ``accelerate launch`` set up, if there is one.

    For the process that owns the run (the CLI), at its very end. Left to interpreter exit, a gloo
    worker thread can still be releasing the last collective's tensors while Python finalizes; it
    then dies in std::terminate and the rank exits with SIGABRT after a run that finished
    correctly, failing the whole launch (about 1 launch in 20 on 2 CPU ranks). Destroying the
    group joins those threads first. Library callers that train several times in one process
    should not call this between runs.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
