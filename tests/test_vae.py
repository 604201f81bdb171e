"""eqm.vae: tiny diffusers VAEs saved to disk and loaded back through load_vae; shapes,
normalisation from the config, latent timestamps of both kinds (uniform rates and a real VFR
file), the sampling plan, identities and the one-line errors."""

import json

import numpy as np
import pytest
import torch
from tiny_vae import save_tiny_kl, save_tiny_wan

from eqm.errors import EqmError
from eqm.timebase import uniform_timestamps
from eqm.vae import (VaeIdentity, latent_timestamps, load_vae, plan_latents, sample_posterior, vae_folder_kind,
                     vae_identity)


@pytest.fixture(scope="module")
def vaes(tmp_path_factory):
    root = tmp_path_factory.mktemp("vaes")
    return {"kl": save_tiny_kl(root / "kl", scaling_factor=0.5, shift_factor=0.25), "wan": save_tiny_wan(root / "wan")}


def test_image_vae_round_trip_and_normalisation(vaes):
    vae = load_vae(vaes["kl"])
    assert (vae.kind, vae.spatial, vae.temporal, vae.latent_channels) == ("image", 8, 1, 4)
    video = torch.rand(2, 3, 5, 32, 48) * 2 - 1
    z = vae.encode(video)
    assert z.shape == (2, 4, 5, 4, 6) and z.dtype == torch.float32
    raw = vae.module.encode(video[1, :, 3][None]).latent_dist.mean[0]  # frame 3 of clip 1, by hand
    torch.testing.assert_close(z[1, :, 3], (raw - 0.25) * 0.5, atol=1e-5, rtol=1e-5)
    out = vae.decode(z)
    assert out.shape == video.shape and out.min() >= -1 and out.max() <= 1
    ref = vae.module.decode(raw[None]).sample[0].clamp(-1, 1)  # decode undoes the normalisation
    torch.testing.assert_close(out[1, :, 3], ref, atol=1e-5, rtol=1e-5)
    mean, logvar = vae.encode_moments(video)
    raw_lv = vae.module.encode(video[1, :, 3][None]).latent_dist.logvar[0]
    torch.testing.assert_close(logvar[1, :, 3], raw_lv + 2 * np.log(0.5), atol=1e-5, rtol=1e-5)
    g = torch.Generator().manual_seed(0)
    draw = sample_posterior(mean, logvar, g)
    assert draw.shape == mean.shape and not torch.equal(draw, mean)


def test_video_vae_round_trip_frame_rule_and_per_channel_stats(vaes):
    vae = load_vae(vaes["wan"])
    assert (vae.kind, vae.spatial, vae.temporal, vae.latent_channels) == ("video", 8, 4, 4)
    video = torch.rand(1, 3, 9, 32, 32) * 2 - 1
    z = vae.encode(video)
    assert z.shape == (1, 4, 3, 4, 4)
    raw = vae.module.encode(video).latent_dist.mean
    mean = torch.tensor([0.1, -0.2, 0.3, 0.0]).view(1, 4, 1, 1, 1)
    std = torch.tensor([1.5, 2.0, 0.5, 1.0]).view(1, 4, 1, 1, 1)
    torch.testing.assert_close(z, (raw - mean) / std, atol=1e-5, rtol=1e-5)
    assert vae.decode(z).shape == (1, 3, 9, 32, 32)
    with pytest.raises(EqmError, match=r"10 frames; .*4k\+1 frames \(e.g. 9 or 13\)"):
        vae.encode(torch.zeros(1, 3, 10, 32, 32))
    with pytest.raises(EqmError, match="divide by the VAE's 8x"):
        vae.encode(torch.zeros(1, 3, 9, 30, 32))


@pytest.mark.parametrize("fps", [8, 24, "30000/1001", 60])
def test_latent_timestamps_at_several_rates(fps):
    ts = uniform_timestamps(13, fps, dtype=torch.float64)
    torch.testing.assert_close(latent_timestamps(ts, 1), ts)
    lt = latent_timestamps(ts, 4)  # latent 0: frame 0; latent k: mean of frames 4k-3..4k
    want = torch.stack([ts[0], ts[1:5].mean(), ts[5:9].mean(), ts[9:13].mean()])
    torch.testing.assert_close(lt, want)
    plan = plan_latents(fps, 13, 4)
    assert plan.num_latents == 4 and plan.frame_timestamps.shape == (13,)
    torch.testing.assert_close(plan.latent_timestamps, lt.float())
    assert plan_latents(fps, 13, 1).num_latents == 13
    with pytest.raises(EqmError, match="4k\\+1"):
        plan_latents(fps, 12, 4)


def test_latent_timestamps_of_a_real_vfr_file(tmp_path):
    from eqm.video.io import read_video, write_video

    pts = np.array([0.0, 0.04, 0.05, 0.3, 0.31, 0.5, 0.62, 0.9, 0.93])
    frames = np.zeros((9, 16, 16, 3), dtype=np.uint8)
    write_video(tmp_path / "vfr.mkv", frames, 30, pts=pts)
    read = read_video(tmp_path / "vfr.mkv").pts
    np.testing.assert_allclose(read, pts, atol=1.5e-3)  # the file keeps its irregular times
    lt = latent_timestamps(read[None], 4)[0]
    np.testing.assert_allclose(lt, [read[0], read[1:5].mean(), read[5:9].mean()])
    np.testing.assert_allclose(latent_timestamps(read, 1), read)


def test_identity_kind_and_errors(vaes, tmp_path):
    kl, wan = load_vae(vaes["kl"]), load_vae(vaes["wan"])
    assert kl.identity.matches(load_vae(vaes["kl"]).identity) and not kl.identity.matches(wan.identity)
    assert vae_folder_kind(vaes["wan"]) == "video"
    pipeline = tmp_path / "pipe"  # a whole pipeline download: the VAE is in vae/
    save_tiny_kl(pipeline / "vae", scaling_factor=0.5, shift_factor=0.25)
    assert load_vae(pipeline).identity.matches(kl.identity)
    with pytest.raises(EqmError, match="VAE folder not found: .*stabilityai/sd-vae-ft-ema"):
        load_vae(tmp_path / "missing")
    with pytest.raises(EqmError, match="looks like a Hugging Face Hub name.*huggingface-cli download"):
        load_vae("stabilityai/sd-vae-ft-ema")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    with pytest.raises(EqmError, match="'UNet2DModel' is not supported"):
        load_vae(bad)
    (bad / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    with pytest.raises(EqmError, match="has no diffusion_pytorch_model.safetensors .*safetensors only"):
        load_vae(bad)
    (bad / "diffusion_pytorch_model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(EqmError, match="cannot load the VAE") as err:
        load_vae(bad)
    assert "\n" not in str(err.value)


def test_identity_tells_apart_finetunes_with_the_same_config(vaes, tmp_path):
    """sd-vae-ft-ema and -mse share a config.json: the weights fingerprint separates them."""
    other = save_tiny_kl(tmp_path / "other", scaling_factor=0.5, shift_factor=0.25, seed=1)
    a, b = vae_identity(vaes["kl"]), vae_identity(other)
    assert a.config_hash == b.config_hash and a.weights_hash != b.weights_hash and not a.matches(b)
    assert a.matches(load_vae(vaes["kl"]).identity)
    older = VaeIdentity.from_dict({k: v for k, v in b.to_dict().items() if k != "weights_hash"})
    assert older.matches(a) and older.matches(b)  # a record without a fingerprint compares class and config


def test_float16_is_raised_for_a_vae_that_asks_for_upcasting(vaes):
    """SD-VAE's config sets force_upcast: in float16 it overflows, so it runs in float32."""
    assert load_vae(vaes["kl"], dtype=torch.float16).dtype == torch.float32  # AutoencoderKL: force_upcast true
    assert load_vae(vaes["kl"], dtype=torch.bfloat16).dtype == torch.bfloat16
