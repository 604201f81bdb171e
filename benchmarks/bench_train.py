"""Training throughput of our EqM transformer, side by side with a reference DiT, as ratios.

What is compared (one training step = EqM loss forward, backward, AdamW step, same batch):

1. ``reference``: the DiT of Hugging Face diffusers (``diffusers.DiTTransformer2DModel``, the
   architecture family the official EqM/SiT image model comes from: patch embedding, adaLN-Zero
   blocks conditioned on timestep + class embeddings, final adaLN layer), configured like ours
   (width, depth, heads, patch, channels, classes), fed timestep 0 as EqM does.  It stands in
   for the official code when that is not at hand (the official ``models.py`` is not a package).
   Skipped, with a note, when diffusers is not installed (``pip install diffusers``).
2. ``ours image``: our EqMTransformer on images (B, C, H, W): the image path (T = 1).
3. ``ours video``: our EqMTransformer on clips (B, C, T, H/k, W/k) with real timestamps
   (k = sqrt(T)), i.e. the same number of tokens per sample as the image run, so the ratio
   to the image path shows the cost of the video machinery (time-aware positions per sample,
   per-frame patch embedding, 3D unpatchify) rather than of longer sequences.
4. ``ours video rope``: the same with 3D RoPE instead of additive sin/cos.

5. ``official`` (with ``--official-models PATH``): the official EqM ``models.py`` (the file of the
   EqM repository, which imports timm), loaded from that path and never copied here; its ``EqM``
   class built at the same configuration, fed timestep 0 (its own sampler does the same).

Printed: samples/s of each (median of ``--repeats`` timed blocks after warm-up; the models take
turns block by block) and the ratios ours-image / reference, ours-image / official, ours-video /
ours-image, ours-video / reference.  ``--bf16`` runs every model under bf16 autocast.  CPU by
default and small (a few tens of seconds on 2 cores); ``--device cuda`` for a GPU.  Numbers on a shared CPU
are noisy: compare ratios from one invocation, not across machines.

    python benchmarks/bench_train.py
    python benchmarks/bench_train.py --official-models ~/src/EqM/models.py     # + the official model
    python benchmarks/bench_train.py --hidden 384 --depth 12 --heads 6 --size 32 --batch 32 --device cuda --bf16
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from eqm.config import EqMConfig
from eqm.model import EqMTransformer
from eqm.objective import eqm_loss


class _ReferenceDiT(torch.nn.Module):
    """diffusers DiT behind our model's call signature (timestep fixed to 0, as EqM does)."""

    def __init__(self, dit):
        super().__init__()
        self.dit = dit

    def forward(self, x, timestamps=None, y=None, *, pos=None):
        t = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        return self.dit(x, timestep=t, class_labels=y, return_dict=False)[0]


def reference_model(args):
    try:
        from diffusers import DiTTransformer2DModel
    except ImportError:
        return None
    dit = DiTTransformer2DModel(
        num_attention_heads=args.heads, attention_head_dim=args.hidden // args.heads, in_channels=args.channels,
        out_channels=args.channels, num_layers=args.depth, sample_size=args.size, patch_size=args.patch,
        num_embeds_ada_norm=args.classes, norm_type="ada_norm_zero",
    )
    return _ReferenceDiT(dit)


class _Official(torch.nn.Module):
    """The official EqM model behind our call signature: timestep 0, labels, learn_sigma's second half dropped."""

    def __init__(self, net, channels: int):
        super().__init__()
        self.net, self.channels = net, channels

    def forward(self, x, timestamps=None, y=None, *, pos=None):
        out = self.net(x, torch.zeros(x.shape[0], device=x.device), y)
        out = out[0] if isinstance(out, tuple) else out
        return out[:, : self.channels]


def official_model(path, args):
    """The official ``EqM`` class from the models.py at ``path`` (imported by path), at our configuration."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(path).expanduser()
    if not path.is_file():
        raise SystemExit(f"error: --official-models {path}: no such file (the EqM repository's models.py)")
    spec = importlib.util.spec_from_file_location("eqm_official_models", path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.parent))  # its own sibling imports
    try:
        spec.loader.exec_module(module)
    except ImportError as e:
        raise SystemExit(f"error: --official-models {path}: {e} (pip install timm)") from None
    finally:
        sys.path.remove(str(path.parent))
    if not hasattr(module, "EqM"):
        raise SystemExit(f"error: --official-models {path}: the file defines no EqM class")
    net = module.EqM(input_size=args.size, patch_size=args.patch, in_channels=args.channels, hidden_size=args.hidden,
                     depth=args.depth, num_heads=args.heads, num_classes=args.classes)
    return _Official(net, args.channels)


def ours(args, frames: int, size: int, pos: str = "sincos"):
    return EqMTransformer(EqMConfig(
        input_size=size, in_channels=args.channels, num_frames=frames, patch_size=args.patch,
        hidden_size=args.hidden, depth=args.depth, num_heads=args.heads, num_classes=args.classes, pos=pos,
    ))


class _Trainer:
    """One model's training step (EqM loss, backward, AdamW) on a fixed batch, timed block by block."""

    def __init__(self, model, x, ts, y, args):
        self.device = torch.device(args.device)
        self.model = model.to(self.device).train()
        self.x, self.y = x.to(self.device), y.to(self.device)
        self.ts = None if ts is None else ts.to(self.device)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.gen = torch.Generator(device=self.device).manual_seed(0)
        self.bf16, self.iters = args.bf16, args.iters
        self.rates: list[float] = []

    def step(self):
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            loss, _ = eqm_loss(self.model, self.x, self.ts, self.y, generator=self.gen)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def block(self):
        """Time args.iters steps and keep their samples/s."""
        self.sync()
        t0 = time.perf_counter()
        for _ in range(self.iters):
            self.step()
        self.sync()
        self.rates.append(self.iters * self.x.shape[0] / (time.perf_counter() - t0))


def throughputs(trainers, args) -> list[float]:
    """Median samples/s of each trainer; blocks run round-robin so that a machine's drift (other
    load, clock changes) falls on every model alike instead of on whichever ran last."""
    for t in trainers:
        for _ in range(args.warmup):
            t.step()
    for _ in range(args.repeats):
        for t in trainers:
            t.block()
    return [statistics.median(t.rates) for t in trainers]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--patch", type=int, default=2)
    ap.add_argument("--size", type=int, default=16, help="image side; clips use size/sqrt(frames)")
    ap.add_argument("--frames", type=int, default=4, help="clip length (a perfect square: equal tokens)")
    ap.add_argument("--channels", type=int, default=4)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast for every model (weights and AdamW stay fp32)")
    ap.add_argument("--official-models", default=None, metavar="PATH",
                    help="the official EqM repository's models.py, imported from there (needs timm)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    k = int(round(args.frames ** 0.5))
    if k * k != args.frames or args.size % (k * args.patch):
        ap.error("--frames must be a perfect square k*k and --size divisible by k*patch (equal tokens)")
    clip = args.size // k
    tokens = (args.size // args.patch) ** 2
    torch.manual_seed(0)
    B = args.batch
    y = torch.randint(0, args.classes, (B,))
    img = torch.randn(B, args.channels, args.size, args.size)
    vid = torch.randn(B, args.channels, args.frames, clip, clip)
    fps = torch.tensor([8.0, 12.0, 24.0, 30.0]).repeat(B)[:B]  # mixed rates in one batch
    ts = torch.arange(args.frames).float()[None] / fps[:, None]

    print(f"config: hidden {args.hidden}, depth {args.depth}, heads {args.heads}, patch {args.patch}, "
          f"{args.channels} channels, batch {B}, {tokens} tokens per sample, device {args.device}, "
          f"{torch.get_num_threads()} threads, {'bf16 autocast' if args.bf16 else 'float32'}")
    entries = {}  # role -> (name, model, input, timestamps)
    ref = reference_model(args)
    if ref is None:
        print("note: diffusers is not installed; the reference column is skipped (pip install diffusers)")
    else:
        entries["reference"] = ("reference DiT (diffusers) image", ref, img, None)
    if args.official_models:
        entries["official"] = ("official EqM (models.py) image", official_model(args.official_models, args), img, None)
    entries["image"] = (f"ours image {args.size}x{args.size}", ours(args, 1, args.size), img, None)
    entries["video"] = (f"ours video {args.frames}x{clip}x{clip} sincos", ours(args, args.frames, clip), vid, ts)
    entries["rope"] = (f"ours video {args.frames}x{clip}x{clip} rope", ours(args, args.frames, clip, "rope"), vid, ts)
    rates = throughputs([_Trainer(m, x, t, y, args) for _, m, x, t in entries.values()], args)
    sps = dict(zip(entries, rates))  # role -> samples/s

    width = max(len(e[0]) for e in entries.values())
    print(f"{'model':<{width}}  {'params':>10}  {'samples/s':>10}")
    for role, (name, m, _, _) in entries.items():
        print(f"{name:<{width}}  {sum(p.numel() for p in m.parameters()):>10,}  {sps[role]:>10.1f}")

    print("ratios (higher = ours faster):")
    for other, label in (("reference", "reference DiT"), ("official", "official EqM")):
        if other in sps:
            print(f"  ours image / {label:<21} {sps['image'] / sps[other]:.3f}")
            print(f"  ours video / {label:<21} {sps['video'] / sps[other]:.3f}   (equal tokens per sample)")
    print(f"  ours video / ours image            {sps['video'] / sps['image']:.3f}   (equal tokens per sample)")
    print(f"  ours video rope / ours video sincos {sps['rope'] / sps['video']:.3f}")


if __name__ == "__main__":
    main()
