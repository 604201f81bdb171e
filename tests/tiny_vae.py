"""Tiny VAEs built from the real diffusers classes and saved with save_pretrained, so tests load
them through eqm.vae.load_vae's real from_pretrained path (8x spatial like SD-VAE and Wan2.1,
4x temporal for Wan; a few thousand parameters, milliseconds per clip on a CPU)."""

from pathlib import Path

import torch


def save_tiny_kl(folder: Path, *, scaling_factor: float = 0.5, shift_factor=None, seed: int = 0) -> Path:
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    AutoencoderKL(
        block_out_channels=(8, 8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1, latent_channels=4,
        norm_num_groups=4, sample_size=64, mid_block_add_attention=False,
        scaling_factor=scaling_factor, shift_factor=shift_factor,
    ).save_pretrained(folder)
    return Path(folder)


def save_tiny_wan(folder: Path) -> Path:
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                     latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.5, 2.0, 0.5, 1.0]).save_pretrained(folder)
    return Path(folder)
