"""The encoder's forward under each way of running it on a device (issue 18, item 6; not a test).

For the batch sizes the batcher forms (1, 8 and 64 by default), images/s of a random-initialised
torchvision ResNet-50 at 224 px (``--arch resnet50``; nothing downloaded) run as:

- ``float32``: eager, NCHW, what ``QSCORE_PRECISION=float32`` serves;
- ``float32-channels_last``: the same weights and input in channels_last;
- ``float16`` / ``bfloat16`` (CUDA only): under autocast, as ``QSCORE_PRECISION`` serves them,
  and each again with channels_last;
- ``*-compiled``: ``torch.compile`` of the best eager variant, ``mode="reduce-overhead"`` on CUDA
  (CUDA graphs, captured per batch size), ``"default"`` on the CPU (``--compile``; needs a C++
  compiler and minutes);
- ``onnxruntime-<provider>``: the ONNX export (``torch.onnx.export(dynamo=True)``, float32) under
  each execution provider ONNX Runtime offers for the device (CUDA and TensorRT need
  ``onnxruntime-gpu``; absent providers are listed as such, not failed).

Beside each rate, what the variant does to the verdicts on the same inputs, against float32
eager: the largest |h| difference relative to the largest |h|, the largest Q-Score difference
(on 120 discriminative features drawn at random, eps 1) and the share of (image, feature) pairs
whose dominance flips. A faster variant that moves Q-Scores is a setting to offer, not a default.

    python -m benchmarks.bench_engine_variants                            # CUDA if present, else CPU
    python -m benchmarks.bench_engine_variants --device cpu --arch resnet18 --image-size 32 --seconds 0.5

Results: ``benchmarks/results/engine-variants-<device>.json`` with the device named.
Imports torch and torchvision (onnxruntime when present) and the project's Q-Score only, so it
runs on a lent GPU machine with nothing else installed.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import re
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torchvision

from benchmarks.common import RESULTS, device_name, load_average, rate, write_result
from models.scoring.qscore import discriminative_mask, q_score_parts

BATCH_SIZES = (1, 8, 64)

#: Random features taken as "discriminative" for the Q-Score comparison, and their eps.
DISCRIMINATIVE, EPS = 120, 1.0

Forward = Callable[[torch.Tensor], torch.Tensor]


def encoder(arch: str, device: torch.device) -> torch.nn.Module:
    """A torchvision ResNet with random weights (seed 0) and no classifier: ``forward`` gives h (N, r)."""
    torch.manual_seed(0)
    net = getattr(torchvision.models, arch)(weights=None)
    net.fc = torch.nn.Identity()
    return net.eval().to(device)


@contextlib.contextmanager
def _no_grad() -> Iterator[None]:
    with torch.inference_mode():
        yield


def eager(net: torch.nn.Module, device: torch.device, dtype: torch.dtype | None, channels_last: bool) -> Forward:
    """``net`` eager, under autocast to ``dtype`` when given, in channels_last when asked; h in float32."""
    if channels_last:
        net = net.to(memory_format=torch.channels_last)

    def forward(x: torch.Tensor) -> torch.Tensor:
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with _no_grad():
            if dtype is None:
                return net(x).float()
            with torch.autocast(device.type, dtype=dtype):
                return net(x).float()

    return forward


def compiled(forward: Forward, device: torch.device) -> Forward:
    """``torch.compile`` of ``forward``: CUDA graphs on CUDA (one capture per batch size)."""
    mode = "reduce-overhead" if device.type == "cuda" else "default"
    return torch.compile(forward, mode=mode, dynamic=False)


def onnx_forwards(net: torch.nn.Module, device: torch.device, image_size: int) -> dict[str, Forward | str]:
    """ONNX Runtime on the float32 export, per provider for ``device``; a string says why one is absent."""
    try:
        import onnxruntime as ort
    except ImportError:
        return {"onnxruntime": "not installed"}
    wanted = ["CPUExecutionProvider"]
    if device.type == "cuda":
        wanted = ["TensorrtExecutionProvider", "CUDAExecutionProvider"]
    x = torch.randn(2, 3, image_size, image_size, device=device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            net, (x,), dynamo=True, dynamic_shapes=({0: torch.export.Dim("batch", min=1)},), verbose=False
        )
    buffer = io.BytesIO()
    program.save(buffer)
    model = buffer.getvalue()
    available = set(ort.get_available_providers())
    out: dict[str, Forward | str] = {}
    for provider in wanted:
        name = f"onnxruntime-{re.sub('ExecutionProvider$', '', provider)}"
        if provider not in available:
            out[name] = f"provider not available (onnxruntime {ort.__version__}: {sorted(available)})"
            continue
        options = [{"device_id": str(device.index or 0)}] if device.type == "cuda" else [{}]
        session = ort.InferenceSession(model, providers=[provider], provider_options=options)
        input_name = session.get_inputs()[0].name

        def forward(x: torch.Tensor, session: Any = session, input_name: str = input_name) -> torch.Tensor:
            (h,) = session.run(None, {input_name: x.float().cpu().numpy()})
            return torch.from_numpy(h).to(x.device)

        out[name] = forward
    return out


def verdict_drift(reference: torch.Tensor, h: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """How far ``h`` moves the verdicts from ``reference`` (both (N, r) float32)."""
    ref_parts, parts = q_score_parts(reference, mask, EPS), q_score_parts(h, mask, EPS)
    scale = float(reference.abs().max().clamp_min(1e-30))
    return {
        "h_max_rel_diff": round(float((h - reference).abs().max()) / scale, 6),
        "q_score_max_abs_diff": round(float((parts.q_score - ref_parts.q_score).abs().max()), 6),
        "dominance_flip_share": round(float((parts.dominant != ref_parts.dominant).float().mean()), 6),
    }


def measure(
    variants: dict[str, Forward | str], device: torch.device, image_size: int, batches: tuple[int, ...], seconds: float
) -> dict[str, Any]:
    """Per variant, images/s at each batch size and its verdict drift against ``float32``."""
    g = torch.Generator(device="cpu").manual_seed(1)
    inputs = torch.randn(max(batches), 3, image_size, image_size, generator=g).to(device)
    reference = variants["float32"](inputs)  # type: ignore[operator]
    mask = discriminative_mask(
        torch.randperm(reference.shape[1], generator=g)[:DISCRIMINATIVE].tolist(), reference.shape[1]
    ).to(device)
    out: dict[str, Any] = {}
    for name, forward in variants.items():
        if isinstance(forward, str):
            out[name] = {"skipped": forward}
            print(f"{name}: {forward}", flush=True)
            continue
        try:
            row = {
                f"batch_{b}_images_per_s": round(rate(lambda f=forward, b=b: f(inputs[:b]), b, device, seconds), 1)
                for b in batches
            }
            row |= verdict_drift(reference, forward(inputs).float(), mask)
        except Exception as exc:  # a variant this device or build lacks: say so, measure the rest
            row = {
                "failed": f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}"
            }
        out[name] = row
        print(f"{name}: {row}", flush=True)
    return out


def variants_for(
    net: torch.nn.Module, device: torch.device, image_size: int, compile_best: bool
) -> dict[str, Forward | str]:
    """Every variant this device can run (channels_last converts a module in place: copies)."""
    variants: dict[str, Forward | str] = {
        "float32": eager(net, device, None, False),
        "float32-channels_last": eager(copy.deepcopy(net), device, None, True),
    }
    if device.type == "cuda":
        for dtype_name, dtype in (("float16", torch.float16), ("bfloat16", torch.bfloat16)):
            variants[dtype_name] = eager(net, device, dtype, False)
            variants[f"{dtype_name}-channels_last"] = eager(copy.deepcopy(net), device, dtype, True)
    variants |= onnx_forwards(net, device, image_size)
    if compile_best:
        best = "float16-channels_last" if device.type == "cuda" else "float32-channels_last"
        variants[f"{best}-compiled"] = compiled(variants[best], device)  # type: ignore[arg-type]
    return variants


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--arch", default="resnet50", help="a torchvision ResNet (resnet18, resnet50, ...)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batches", default=",".join(map(str, BATCH_SIZES)), help="comma-separated batch sizes")
    parser.add_argument("--seconds", type=float, default=3.0, help="length of each measurement")
    parser.add_argument("--compile", action="store_true", help="also torch.compile the best eager variant")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    batches = tuple(int(b) for b in args.batches.split(","))
    net = encoder(args.arch, device)
    result: dict[str, Any] = {
        "device": device_name(device),
        "torch": torch.__version__,
        "arch": f"{args.arch} (random weights), {args.image_size} px",
        "loadavg_at_start": load_average(),
        "variants": measure(
            variants_for(net, device, args.image_size, args.compile), device, args.image_size, batches, args.seconds
        ),
    }
    result["loadavg_at_end"] = load_average()
    tag = re.sub(r"[^a-z0-9]+", "-", result["device"].lower()).strip("-")
    write_result(args.out or RESULTS / f"engine-variants-{tag}.json", result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
