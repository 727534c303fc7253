"""The variants section of `lstm bench`: a training step of each LSTM variant at one shape, on the
fused kernel and as a PyTorch per-step loop (the reference kernel: the paper's equations, one
step at a time, autograd through the steps), against the plain fused LSTM; proj_size also
against torch.nn.LSTM(proj_size), which oneDNN does not run."""

from __future__ import annotations

import statistics

import torch

from .. import kernels
from ..layers import LSTM
from .bench_cases import Contender, _zero

SHAPE = (32, 80, 100, 64)
VARIANTS = ("peephole", "layer_norm", "proj_size", "coupled", "zoneout", "recurrent_dropconnect", "forget_bias",
            "cell_clip")
PLAIN = "plain (fused)"
TORCH_PROJ = "torch.nn.LSTM(proj_size=H/2)"


def variant_options(variant: str, units: int) -> dict:
    """The options as a user writes them; zoneout and DropConnect act in training, as timed."""
    return {"peephole": {"peephole": True}, "layer_norm": {"layer_norm": True}, "proj_size": {"proj_size": units // 2},
            "coupled": {"coupled": True}, "zoneout": {"zoneout": 0.1}, "recurrent_dropconnect": {"recurrent_dropconnect": 0.2},
            "forget_bias": {"forget_bias": 1.0}, "cell_clip": {"cell_clip": 3.0}}[variant]


def fused_name(variant: str) -> str:
    return f"{variant} (fused)"


def loop_name(variant: str) -> str:
    return f"{variant} (per-step loop)"


def _train_step(layer, x, kernel=None):
    def train():
        if kernel is None:
            layer(x).sum().backward()
        else:
            with kernels.use(kernel):
                layer(x).sum().backward()
    return train


def variant_contenders(shape: tuple = SHAPE, seed: int = 0) -> list[Contender]:
    """Training-step contenders: the plain fused LSTM, each variant fused and as a loop, and
    torch.nn.LSTM(proj_size)."""
    B, T, D, H = shape
    torch.manual_seed(seed)
    x = torch.randn(B, T, D)
    result = []
    plain = LSTM(H, return_sequences=True, input_dim=D).train()
    result.append(Contender(PLAIN, train=_train_step(plain, x), zero_grad=_zero(plain.parameters())))
    for variant in VARIANTS:
        layer = LSTM(H, return_sequences=True, input_dim=D, **variant_options(variant, H)).train()
        zero = _zero(layer.parameters())
        result.append(Contender(fused_name(variant), train=_train_step(layer, x), zero_grad=zero,
                                info={"module": layer}))
        result.append(Contender(loop_name(variant), train=_train_step(layer, x, "reference"), zero_grad=zero))
    torch_proj = torch.nn.LSTM(D, H, proj_size=H // 2, batch_first=True)
    result.append(Contender(TORCH_PROJ, train=lambda: torch_proj(x)[0].sum().backward(),
                            zero_grad=_zero(torch_proj.parameters())))
    return result


def is_fused(contender: Contender) -> bool:
    """The plain fused LSTM and the fused variants: timed in a group of their own (see bench.py)."""
    return contender.name == PLAIN or contender.name.endswith(" (fused)")


def paired_ratio(samples: list, baseline: list) -> float:
    """The median over rounds of a sample / the baseline's sample of the same round: the
    contenders of one group take turns every round, so a slow phase of the machine (seconds
    long here) slows both sides of a round's ratio, while it can pick the two minima apart."""
    return statistics.median(s / b for s, b in zip(samples, baseline))


def summarize(shape: tuple, timings: dict) -> list[dict]:
    """One row per variant: min times, the ratio to the plain fused LSTM (target <= 1.3; the
    median of the rounds' ratios, and the ratio of the minima) and the speedup over its loop
    (target >= 5); proj_size also the speedup over torch.nn.LSTM (>= 1)."""
    plain_samples = timings[PLAIN]["samples"]
    plain = min(plain_samples)
    rows = []
    for variant in VARIANTS:
        samples = timings[fused_name(variant)]["samples"]
        fused = min(samples)
        loop = min(timings[loop_name(variant)]["samples"])
        row = {"variant": variant, "shape": list(shape), "options": variant_options(variant, shape[3]), "fused_min_s": fused,
               "loop_min_s": loop, "plain_min_s": plain, "vs_plain": paired_ratio(samples, plain_samples),
               "vs_plain_min": fused / plain, "speedup_vs_loop": loop / fused}
        if variant == "proj_size":
            torch_min = min(timings[TORCH_PROJ]["samples"])
            row.update(torch_min_s=torch_min, speedup_vs_torch=torch_min / fused)
        rows.append(row)
    return rows


def table_rows(rows: list[dict]) -> list[list[str]]:
    head = ["variant", "fused ms", "x plain fused", "x plain (mins)", "loop ms", "speedup vs loop", "note"]
    table = [head]
    for r in rows:
        note = ""
        if "speedup_vs_torch" in r:
            note = f"{TORCH_PROJ} {r['torch_min_s'] * 1e3:.2f} ms: {r['speedup_vs_torch']:.2f}x"
        table.append([r["variant"], f"{r['fused_min_s'] * 1e3:.2f}", f"{r['vs_plain']:.2f}", f"{r['vs_plain_min']:.2f}",
                      f"{r['loop_min_s'] * 1e3:.1f}", f"{r['speedup_vs_loop']:.1f}x", note])
    return table
