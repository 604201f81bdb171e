"""Memory and work estimates made before anything is allocated.

A typo (``model.hidden_size=1000000``, ``data.height=20000``, ``train.batch_size=100000000``, a
state.json with a huge architecture, ``sample --frames 4096`` on a model with many tokens per
frame) must be refused in a second with the estimate, not after minutes of swapping or a
MemoryError. The estimates are deliberately low (they count the large terms only), so what they
refuse really cannot fit; docs/reliability.md lists where each check runs.
"""

from __future__ import annotations

import os
from typing import Optional

from .errors import EqmError

#: Most tokens (frames x patches per frame) in one clip: attention work grows with the square.
#: On a GPU 65536 tokens (~4e9 query-key pairs per layer and sample) is 8x the largest shipped
#: recipe's clip (8192); a CPU gets a quarter of that, 16x less attention work, since a cap that
#: leaves hours of work per sampler step bounds nothing.
MAX_TOKENS = 65536
MAX_TOKENS_CPU = 16384

_FLOAT = 4  # bytes per float32 value


def format_bytes(n: float) -> str:
    """'23.4 GiB' style."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:.3g} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.3g} PiB"  # pragma: no cover


def machine_memory(device: Optional[object] = None) -> int:
    """Bytes of memory the computation can use: the GPU's for a CUDA device, else the machine's RAM."""
    if _is_cuda(device):
        import torch

        return int(torch.cuda.get_device_properties(device).total_memory)
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):  # not POSIX: assume a large workstation
        return 256 * 1024**3


def model_params(*, hidden_size: int, depth: int, mlp_ratio: float = 4.0, in_channels: int = 3, patch_size: int = 2,
                 temporal_patch: int = 1, num_classes: int = 0, grid_tokens: int = 1) -> int:
    """Parameter count of an EqMTransformer, from its architecture (the large terms, exactly)."""
    D = int(hidden_size)
    per_block = (4 + 2 * float(mlp_ratio) + 6) * D * D  # qkv + proj, MLP, adaLN modulation (D -> 6D)
    patch = int(in_channels) * int(patch_size) ** 2 * int(temporal_patch) * D
    tables = (int(num_classes) + 1 + int(grid_tokens) + 256) * D + 2 * D * D  # labels, pos, t-embedder
    final = 2 * D * D + patch
    return int(int(depth) * per_block + patch + tables + final)


def check_model(where: str, *, device=None, **arch) -> int:
    """EqmError when the weights alone of ``arch`` (model_params' keywords) exceed the machine's
    memory; returns the parameter count."""
    n = model_params(**arch)
    need, have = n * _FLOAT, machine_memory(device)
    if need > have:
        raise EqmError(f"{where}: the model would have {n:.3g} parameters ({format_bytes(need)} of float32 weights: "
                       f"hidden_size {arch['hidden_size']}, depth {arch['depth']}, {arch.get('grid_tokens', 1)} "
                       f"positions per frame); this machine has {format_bytes(have)}")
    return n


def _is_cuda(device) -> bool:
    return device is not None and getattr(device, "type", str(device)).startswith("cuda")


def check_tokens(tokens: int, where: str, device=None) -> None:
    """EqmError when one clip has more tokens than MAX_TOKENS (MAX_TOKENS_CPU off a CUDA device)."""
    cap = MAX_TOKENS if _is_cuda(device) else MAX_TOKENS_CPU
    if tokens > cap:
        raise EqmError(f"{where}: {tokens} tokens per clip, more than the {cap} attention can handle "
                       "(tokens = frames / temporal_patch x (height / patch_size) x (width / patch_size)); "
                       "use fewer frames, smaller frames or a larger patch")


def check_activations(where: str, *, batch: int, tokens: int, hidden_size: int, depth: int, params: int = 0,
                      training: bool = False, device=None) -> int:
    """EqmError when a batch of ``batch`` clips of ``tokens`` tokens cannot fit; returns the estimate.

    A lower bound: inference holds at least the 4 x hidden MLP activation of one block; training
    keeps at least that of every block for the backward pass (2 bytes a value, as under mixed
    precision), plus float32 weights, gradients, two Adam moments and the EMA (5 copies).
    """
    check_tokens(tokens, where, device)
    values = int(batch) * int(tokens) * 4 * int(hidden_size)
    need = values * (2 * int(depth) if training else _FLOAT) + params * _FLOAT * (5 if training else 1)
    have = machine_memory(device)
    if need > have:
        what = "training" if training else "sampling"
        raise EqmError(f"{where}: {what} {batch} clip(s) of {tokens} tokens at once needs about {format_bytes(need)}; "
                       f"this machine has {format_bytes(have)} (lower the batch size, the frames or the frame size)")
    return need
