"""One LoRA training step of a small FLUX.1 on CPU: ours against diffusers + peft.

Both sides hold the same random weights (ours in the BFL key layout, diffusers' through its
own converter, as tests/test_flux.py does) and get a rank-16 LoRA on the equivalent
Linears of every double and single block. One step is: zero the gradients, forward, MSE
against a fixed target, backward, AdamW step (optim.build_optimizer, the foreach
implementation on CPU) on the LoRA parameters only. The two steps alternate, after a
warm-up, on the same inputs; reported are the median, min and max per-step times, wall
and CPU, and the ratio ours / theirs three ways: the median of the per-pair ratios (each
pair is two adjacent steps, so a burst of load from other processes mostly hits both; the
headline figure), the ratio of the medians and the ratio of the minima. On a quiet machine
the three agree; on a shared one the ratio of the medians can swing widely.

It lives in tests/ because diffusers and peft are test-only dependencies (the oracles); it
is a script, not a test (pytest does not collect it).

    python tests/bench_train_step.py                  # defaults below, 2 threads
    python tests/bench_train_step.py --reps 50 --batch 2
    python tests/bench_train_step.py --profile        # also a torch.profiler table of each side

The LoRA targets cannot match exactly: where BFL fuses q, k and v into one Linear (a
double block's img_attn.qkv, a single block's linear1 = [q | k | v | mlp_in]), diffusers
has separate to_q / to_k / to_v (/ proj_mlp) Linears, each with its own LoRA. Ours has one
down projection per fused Linear, theirs three or four, so ours trains fewer parameters;
both counts are printed. Not part of the test suite (diffusers and peft are test-only).
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from anywhere
sys.path.insert(0, str(ROOT / "tests"))  # the BFL -> diffusers conversion of the oracle tests

from lora import LoRANetwork, flux_lora_targets  # noqa: E402
from models.flux import Flux, FluxParams, img_ids, pack, txt_ids  # noqa: E402
from optim import build_optimizer  # noqa: E402
from test_flux import diffusers_model, random_state_dict  # noqa: E402

RANK = 16
LR = 1e-4

# BFL Linear (inside a block) -> the diffusers Linears that compute the same rows
DOUBLE_TO_DIFFUSERS = {
    "img_mod.lin": ["norm1.linear"],
    "txt_mod.lin": ["norm1_context.linear"],
    "img_attn.qkv": ["attn.to_q", "attn.to_k", "attn.to_v"],
    "img_attn.proj": ["attn.to_out.0"],
    "txt_attn.qkv": ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"],
    "txt_attn.proj": ["attn.to_add_out"],
    "img_mlp.0": ["ff.net.0.proj"],
    "img_mlp.2": ["ff.net.2"],
    "txt_mlp.0": ["ff_context.net.0.proj"],
    "txt_mlp.2": ["ff_context.net.2"],
}
SINGLE_TO_DIFFUSERS = {
    "linear1": ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"],
    "linear2": ["proj_out"],
    "modulation.lin": ["norm.linear"],
}


def bench_params(args) -> FluxParams:
    head_dim = args.hidden // args.heads
    rest = head_dim - 16  # axes: 16 for the (zero) first axis, the rest split evenly, all even
    axes = [16, rest // 2 - (rest // 2) % 2, 0]
    axes[2] = head_dim - axes[0] - axes[1]
    return FluxParams(hidden_size=args.hidden, num_heads=args.heads, axes_dim=axes, depth=args.double,
                      depth_single_blocks=args.single, context_in_dim=args.context_dim, vec_in_dim=768,
                      guidance_embed=True)


def diffusers_targets(our_targets: dict[str, int]) -> list[str]:
    """Full diffusers module names for our module paths (full names: peft matches them exactly,
    where a bare 'proj_out' would also catch the model's final projection)."""
    names = []
    for path in our_targets:
        kind, index, sub_path = path.split(".", 2)
        if kind == "double_blocks":
            names += [f"transformer_blocks.{index}.{n}" for n in DOUBLE_TO_DIFFUSERS[sub_path]]
        else:
            names += [f"single_transformer_blocks.{index}.{n}" for n in SINGLE_TO_DIFFUSERS[sub_path]]
    return names


def make_inputs(params: FluxParams, args) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    b = args.batch
    h = w = args.latent
    return dict(
        img=pack(torch.randn(b, params.in_channels // 4, h, w, generator=g)),
        img_ids=img_ids(b, h, w),
        txt=torch.randn(b, args.txt_len, params.context_in_dim, generator=g),
        txt_ids=txt_ids(b, args.txt_len),
        timesteps=torch.rand(b, generator=g),
        y=torch.randn(b, params.vec_in_dim, generator=g),
        guidance=torch.full((b,), 3.5),
    )


def diffusers_kwargs(x: dict) -> dict:
    return dict(hidden_states=x["img"], encoder_hidden_states=x["txt"], pooled_projections=x["y"],
                timestep=x["timesteps"], img_ids=x["img_ids"][0], txt_ids=x["txt_ids"][0],
                guidance=x["guidance"], return_dict=False)


def build_ours(sd: dict, params: FluxParams):
    model = Flux.from_state_dict(dict(sd), axes_dim=params.axes_dim)
    model.requires_grad_(False)
    targets = flux_lora_targets(model, RANK)
    network = LoRANetwork.inject(model, targets, alpha=RANK)
    network.train()
    optimizer = build_optimizer(network.parameters(), "adamw", lr=LR)

    def forward(x):
        return model(**x)

    return forward, list(network.parameters()), optimizer, targets


def build_theirs(sd: dict, params: FluxParams, our_targets: dict[str, int]):
    from peft import LoraConfig

    model = diffusers_model(sd, params)
    model.requires_grad_(False)
    names = diffusers_targets(our_targets)
    modules = dict(model.named_modules())
    missing = [n for n in names if not isinstance(modules.get(n), torch.nn.Linear)]
    assert not missing, f"no such diffusers Linear: {missing}"
    model.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, init_lora_weights=True, target_modules=names))
    model.train()
    lora_params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(lora_params, "adamw", lr=LR)

    def forward(x):
        return model(**diffusers_kwargs(x))[0]

    return forward, lora_params, optimizer, names


def train_step(forward, optimizer, x: dict, target: torch.Tensor) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss = F.mse_loss(forward(x), target)
    loss.backward()
    optimizer.step()


def timed_step(forward, optimizer, x, target) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process): on a shared machine the CPU time is the steadier
    figure, as it does not count the time the threads spent waiting for a core."""
    start_wall, start_cpu = time.perf_counter(), time.process_time()
    train_step(forward, optimizer, x, target)
    return time.perf_counter() - start_wall, time.process_time() - start_cpu


def profile(name: str, forward, optimizer, x, target, rows: int) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            train_step(forward, optimizer, x, target)
    print(f"\n--- {name}: 3 steps, by self CPU time ---")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def summary(times: list[float]) -> str:
    ms = [t * 1e3 for t in times]
    return f"median {statistics.median(ms):8.1f} ms   min {min(ms):8.1f}   max {max(ms):8.1f}"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--double", type=int, default=2, help="double-stream blocks")
    parser.add_argument("--single", type=int, default=4, help="single-stream blocks")
    parser.add_argument("--latent", type=int, default=32, help="latent side: (latent/2)^2 image tokens")
    parser.add_argument("--txt-len", type=int, default=64)
    parser.add_argument("--context-dim", type=int, default=256, help="T5 width (4096 in FLUX.1)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--profile", action="store_true", help="print a torch.profiler table of each side")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    params = bench_params(args)
    sd = random_state_dict(params)
    x = make_inputs(params, args)

    ours, our_params, our_opt, our_targets = build_ours(sd, params)
    theirs, their_params, their_opt, their_targets = build_theirs(sd, params, our_targets)

    # sanity: before any update both LoRAs are zero (up / lora_B start at 0), so outputs match
    with torch.no_grad():
        out_ours, out_theirs = ours(x), theirs(x)
    max_diff = (out_ours - out_theirs).abs().max().item()
    assert max_diff <= 1e-5, f"forward outputs differ by {max_diff:.2e}: the two models do not match"
    target = torch.randn(out_ours.shape, generator=torch.Generator().manual_seed(2))

    n_img, n_txt = x["img"].shape[1], x["txt"].shape[1]
    print(f"FLUX: hidden {params.hidden_size}, {params.num_heads} heads x {params.hidden_size // params.num_heads} "
          f"(axes {params.axes_dim}), {params.depth} double + {params.depth_single_blocks} single blocks, "
          f"context {params.context_in_dim}")
    print(f"batch {args.batch}, {n_img} image + {n_txt} text tokens, fp32, CPU, {torch.get_num_threads()} threads")
    print(f"LoRA rank {RANK}, alpha {RANK}; AdamW lr {LR}")
    print(f"  ours:   {len(our_targets):3d} Linears, {len(our_params):3d} tensors, "
          f"{sum(p.numel() for p in our_params):,} trainable parameters")
    print(f"  theirs: {len(their_targets):3d} Linears, {len(their_params):3d} tensors, "
          f"{sum(p.numel() for p in their_params):,} trainable parameters "
          "(q, k, v [, mlp_in] split: one down projection each)")
    print(f"forward before training: max |ours - theirs| = {max_diff:.2e}")

    for _ in range(args.warmup):
        train_step(ours, our_opt, x, target)
        train_step(theirs, their_opt, x, target)
    wall, cpu = {"ours": [], "theirs": []}, {"ours": [], "theirs": []}
    for rep in range(args.reps):
        # alternate which goes first, so that neither always follows the other
        order = [("ours", ours, our_opt), ("theirs", theirs, their_opt)]
        for name, forward, optimizer in order if rep % 2 == 0 else order[::-1]:
            seconds, cpu_seconds = timed_step(forward, optimizer, x, target)
            wall[name].append(seconds)
            cpu[name].append(cpu_seconds)

    print(f"\n{args.reps} alternating steps after {args.warmup} warm-up steps each:")
    for what, times in (("wall (perf_counter)", wall), ("CPU (process_time)", cpu)):
        print(f"{what}:")
        print(f"  ours   {summary(times['ours'])}")
        print(f"  theirs {summary(times['theirs'])}")
        pair_ratios = [a / b for a, b in zip(times["ours"], times["theirs"])]  # steps i of both ran back to back
        of_medians = statistics.median(times["ours"]) / statistics.median(times["theirs"])
        of_minima = min(times["ours"]) / min(times["theirs"])
        print(f"  ratio ours / theirs: {statistics.median(pair_ratios):.3f} (median of per-pair ratios, which "
              f"run from {min(pair_ratios):.3f} to {max(pair_ratios):.3f}); of medians {of_medians:.3f}, "
              f"of minima {of_minima:.3f}")

    if args.profile:
        profile("ours", ours, our_opt, x, target, rows=25)
        profile("theirs", theirs, their_opt, x, target, rows=25)


if __name__ == "__main__":
    main()
