"""The device check: on a CUDA machine, what the GPU route computes and how fast, in a few minutes.

    python benchmarks/gpu_check.py --out OUT          # on the GPU machine
    python benchmarks/gpu_check.py --smoke --out OUT  # tiny shapes on whatever device there is (here: the CPU)

Steps, each written to OUT/results.json as soon as it is done (a run cut short still reports):
  environment  torch, CUDA, cuDNN, the GPU, TF32 settings
  correctness  this library's layers on the device (LSTM and GRU; plain, and lengths with
               go_backwards) against the float64 reference kernel on the same device: outputs,
               final states and every gradient, as relative norm errors (tolerances: float32 1e-5,
               TF32 5e-3), and the kernel each case dispatches to
  variants     what cuDNN cannot run (the Triton kernels, tier 1): LSTM variants, masks with holes,
               recurrent dropout and zoneout in training, bfloat16: the same check against the
               float64 reference kernel (tolerances: float32 1e-5, bfloat16 2e-2)
  timing       inference forward (no_grad) and training step (forward + backward of sum(out * g)),
               the layer against torch.nn.LSTM / GRU (cuDNN) at the bench shapes, float32 with TF32
               off and on, and both under bfloat16 autocast: median ms and the ratio (>= 1: ours
               faster)
  variant time the tier-1 cases against the same layer on the reference kernel (a PyTorch loop of
               small ops per step, what the layer ran on a GPU before): median ms and the ratio

Without a GPU (--smoke) the Triton kernels run under Triton's interpreter on the CPU, forced.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # (before triton is imported: --smoke on the CPU)

import lstm  # noqa: E402
from lstm import layers  # noqa: E402

SHAPES = [(2, 80, 100, 64), (32, 80, 100, 64), (64, 100, 128, 256), (16, 500, 32, 128), (256, 50, 64, 512),
          (16, 1024, 768, 768)]
SMOKE_SHAPES = [(2, 6, 3, 4), (3, 5, 4, 8)]
TOLERANCE = {"float32": 1e-5, "tf32": 5e-3, "bfloat16": 2e-2}
# tier 1: (kind, layer options, call options) of the cases cuDNN cannot run
VARIANTS = {
    "peephole, mask with holes": ("lstm", {"peephole": True}, {"mask": "holes"}),
    "layer_norm": ("lstm", {"layer_norm": True}, {}),
    "proj_size": ("lstm", {"proj_size": "units/2"}, {}),
    "zoneout, recurrent_dropout (training)": ("lstm", {"zoneout": 0.1, "recurrent_dropout": 0.2}, {"training": True}),
    "bfloat16 autocast, mask with holes": ("lstm", {}, {"mask": "holes", "autocast": True}),
    "reset_after=False, recurrent_dropout (training)": ("gru", {"reset_after": False, "recurrent_dropout": 0.2},
                                                        {"training": True}),
    "mask with holes": ("gru", {}, {"mask": "holes"}),
    "relu, mask with holes": ("simple_rnn", {"activation": "relu"}, {"mask": "holes"}),
}
TIER1_KERNELS = {"lstm": "triton_lstm", "gru": "triton_gru_simple_rnn", "simple_rnn": "triton_gru_simple_rnn"}
VARIANT_SHAPES = [(32, 80, 100, 64), (64, 100, 128, 256)]


def environment(device: torch.device) -> dict:
    info = {"torch": torch.__version__, "device": str(device), "lstm_kernels_cpu": lstm.kernels.native_build()}
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        info.update(gpu=properties.name, sms=properties.multi_processor_count, cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version(), cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
                    matmul_precision=torch.get_float32_matmul_precision())
    return info


def _layer(kind: str, units: int, device, dtype=torch.float32, **options):
    layer_class = {"lstm": layers.LSTM, "gru": layers.GRU, "simple_rnn": layers.SimpleRNN}[kind]
    return layer_class(units, return_sequences=True, return_state=True, dtype=str(dtype).split(".")[1],
                       **options).to(device)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def _outputs_and_gradients(layer, x, kernel=None, **call):
    x = x.clone().requires_grad_()
    context = lstm.kernels.use(kernel) if kernel else torch.enable_grad()
    with context:
        outputs = layer(x, **call)
    weights = torch.Generator().manual_seed(0)
    loss = sum((o * torch.randn(o.shape, generator=weights, dtype=torch.float64).to(o)).sum() for o in outputs)
    grads = torch.autograd.grad(loss, [x, *layer.parameters()], allow_unused=True)
    return [o.detach() for o in outputs] + [g for g in grads if g is not None]


def correctness(device, shapes) -> list:
    rows = []
    for kind in ("lstm", "gru"):
        for shape in shapes:
            B, T, D, H = shape
            cases = {"plain": {}}
            if shape == shapes[min(1, len(shapes) - 1)]:
                cases["lengths, go_backwards"] = {"go_backwards": True}
            for case, options in cases.items():
                torch.manual_seed(0)
                layer = _layer(kind, H, device, input_dim=D, **options)
                x = torch.randn(B, T, D, device=device)
                call = {"lengths": torch.randint(0, T + 1, (B,), device=device)} if options else {}
                chosen = lstm.kernels.select(layer.recurrence(x, **call)).name
                double = _layer(kind, H, device, torch.float64, input_dim=D, **options)
                double.load_state_dict({k: v.double() for k, v in layer.state_dict().items()})
                expected = _outputs_and_gradients(double, x.double(), "reference", **call)
                for precision, tf32 in (("float32", False), ("tf32", True)):
                    torch.backends.cudnn.allow_tf32 = tf32
                    got = _outputs_and_gradients(layer, x, **call)
                    errors = [_relative(g, e) for g, e in zip(got, expected)]
                    rows.append({"kind": kind, "shape": list(shape), "case": case, "precision": precision,
                                 "kernel": chosen, "max_relative_error": max(errors),
                                 "ok": max(errors) <= TOLERANCE[precision]})
    torch.backends.cudnn.allow_tf32 = True
    return rows


def _variant_layer(kind: str, layer_options: dict, units: int, device, dtype=torch.float32, **options):
    sized = {k: units // 2 if v == "units/2" else v for k, v in layer_options.items()}
    return _layer(kind, units, device, dtype, **sized, **options)


def _forced(device, kind: str):
    """The kernel a tier-1 case is forced onto: on the CPU (--smoke) the interpreter runs it only
    when forced; on a GPU the dispatch chooses it."""
    return TIER1_KERNELS[kind] if device.type == "cpu" else None


def _variant_call(layer, x, call: dict, kernel):
    """The layer's outputs and gradients for a tier-1 case (a fresh seed: the same dropout and
    zoneout draws each time)."""
    options = dict(call)
    if options.pop("mask", None) == "holes":
        options["mask"] = torch.rand(x.shape[:2], generator=torch.Generator().manual_seed(1)).to(x.device) < 0.8
    autocast = options.pop("autocast", False)
    torch.manual_seed(7)
    context = torch.autocast(x.device.type, dtype=torch.bfloat16) if autocast else torch.enable_grad()
    with context:
        return _outputs_and_gradients(layer, x, kernel, **options)


def _variant_cases(device, shapes):
    """(shape, case, kind, layer options, call options, the float32 layer, its input x) of each
    tier-1 case at each shape."""
    for shape in shapes:
        B, T, D, H = shape
        for case, (kind, layer_options, call) in VARIANTS.items():
            torch.manual_seed(0)
            layer = _variant_layer(kind, layer_options, H, device, input_dim=D)
            yield shape, case, kind, layer_options, call, layer, torch.randn(B, T, D, device=device)


def variants(device, shapes) -> list:
    rows = []
    for shape, case, kind, layer_options, call, layer, x in _variant_cases(device, shapes):
        _, _, D, H = shape
        forced = _forced(device, kind)
        with lstm.kernels.use(forced) if forced else torch.enable_grad():
            chosen = lstm.kernels.select(layer.recurrence(x.to(torch.bfloat16) if call.get("autocast") else x)).name
        double = _variant_layer(kind, layer_options, H, device, torch.float64, input_dim=D)
        double.load_state_dict({k: v.double() for k, v in layer.state_dict().items()})
        expected = _variant_call(double, x.double(), {k: v for k, v in call.items() if k != "autocast"},
                                 "reference")
        got = _variant_call(layer, x, call, forced)
        error = max(_relative(g, e) for g, e in zip(got, expected))
        precision = "bfloat16" if call.get("autocast") else "float32"
        rows.append({"kind": kind, "shape": list(shape), "case": case, "precision": precision, "kernel": chosen,
                     "max_relative_error": error, "ok": error <= TOLERANCE[precision]})
    return rows


def _median_ms(function, device, repeats: int) -> float:
    times = []
    for _ in range(repeats + 2):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        function()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times[2:])


def timing(device, shapes, repeats: int) -> list:
    rows = []
    for kind in ("lstm", "gru"):
        for shape in shapes:
            B, T, D, H = shape
            torch.manual_seed(0)
            ours = _layer(kind, H, device, input_dim=D)
            theirs = lstm.to_torch(ours).to(device)
            x = torch.randn(B, T, D, device=device)
            g = torch.randn(B, T, H, device=device)
            calls = {
                "lstm": (lambda: ours(x)[0], lambda: (ours(x)[0] * g).sum().backward()),
                "torch": (lambda: theirs(x)[0], lambda: (theirs(x)[0] * g).sum().backward()),
            }
            for precision in ("float32", "tf32", "bfloat16 autocast"):
                torch.backends.cudnn.allow_tf32 = precision == "tf32"
                autocast = precision.startswith("bfloat16")
                for mode in ("forward", "train"):
                    medians, errors = {}, {}
                    for name, (forward, train) in calls.items():
                        try:
                            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                                if mode == "forward":
                                    with torch.no_grad():
                                        medians[name] = _median_ms(forward, device, repeats)
                                else:
                                    medians[name] = _median_ms(train, device, repeats)
                        except RuntimeError as error:  # (oneDNN has no bf16 LSTM under autocast on some CPUs)
                            medians[name], errors[name] = None, str(error).splitlines()[0]
                    both = medians["lstm"] is not None and medians["torch"] is not None
                    rows.append({"kind": kind, "shape": list(shape), "precision": precision, "mode": mode,
                                 "lstm_ms": medians["lstm"], "torch_ms": medians["torch"],
                                 "speedup": medians["torch"] / medians["lstm"] if both else None,
                                 **({"errors": errors} if errors else {})})
    torch.backends.cudnn.allow_tf32 = True
    return rows


def variant_timing(device, shapes, repeats: int) -> list:
    rows = []
    for shape, case, kind, _, call, layer, x in _variant_cases(device, shapes):
        medians = {}
        for name, kernel in (("tier1", _forced(device, kind)), ("reference", "reference")):
            medians[name] = _median_ms(lambda: _variant_call(layer, x, call, kernel), device, repeats)
        rows.append({"kind": kind, "shape": list(shape), "case": case, "mode": "train",
                     "tier1_ms": medians["tier1"], "reference_ms": medians["reference"],
                     "speedup": medians["reference"] / medians["tier1"]})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="gpu_check_out", help="folder for results.json")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, on the CPU when there is no GPU")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.smoke:
        parser.error("no CUDA device: run with --smoke to check the script on the CPU")
    shapes = SMOKE_SHAPES if args.smoke else SHAPES
    os.makedirs(args.out, exist_ok=True)
    results = {"environment": environment(device)}

    def save():
        with open(os.path.join(args.out, "results.json"), "w") as file:
            json.dump(results, file, indent=1)

    save()
    results["correctness"] = correctness(device, shapes if args.smoke else shapes[:5])
    save()
    results["variants"] = variants(device, SMOKE_SHAPES[:1] if args.smoke else VARIANT_SHAPES)
    save()
    results["timing"] = timing(device, shapes, 3 if args.smoke else args.repeats)
    save()
    results["variant_timing"] = variant_timing(device, SMOKE_SHAPES[:1] if args.smoke else VARIANT_SHAPES,
                                               2 if args.smoke else 5)
    save()
    print(json.dumps(results["environment"]))
    for row in results["correctness"] + results["variants"]:
        print(f"check  {row['kind']:<10} {str(row['shape']):<22} {row['case']:<22} {row['precision']:<8} "
              f"{row['kernel']:<22} {row['max_relative_error']:.2e} {'ok' if row['ok'] else 'FAIL'}")
    for row in results["timing"]:
        times = (f"lstm {row['lstm_ms']:8.3f} ms  torch {row['torch_ms']:8.3f} ms  {row['speedup']:.2f}x"
                 if row["speedup"] is not None else f"raised: {row['errors']}")
        print(f"time   {row['kind']:<4} {str(row['shape']):<22} {row['precision']:<17} {row['mode']:<7} {times}")
    for row in results["variant_timing"]:
        print(f"time   {row['kind']:<10} {str(row['shape']):<22} {row['case']:<48} {row['mode']:<7} "
              f"tier 1 {row['tier1_ms']:8.3f} ms  reference {row['reference_ms']:8.3f} ms  {row['speedup']:.2f}x")
    return 0 if all(row["ok"] for row in results["correctness"] + results["variants"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
