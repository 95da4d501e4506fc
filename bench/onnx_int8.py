"""`python -m bench.onnx_int8`: the image backbone on ONNX Runtime in float32 and in static int8, against torch.

Rows: images/s of the model alone in batches of 8 (torch fp32, torch as configured (bf16 here), ONNX Runtime
fp32, and int8 variants), and each variant's cosine to the torch float32 rows on photos it was not calibrated
on (the sample's web and shelf photos, and grocery val photos when ../shared is there). Int8 is ONNX Runtime's
static quantization (QDQ, per channel, calibrated on 64 other photos), with the stem and the head convolution
kept in float32 or not. The product ships a runtime only where it holds cosine >= 0.995 for every photo."""

from __future__ import annotations

import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from retrieval.encoders import load_image_encoder
from retrieval.encoders.onnx_backbone import INPUT, OUTPUT, OnnxImageEncoder, exported
from retrieval.encoders.timm_backbone import TimmImageEncoder
from retrieval.settings import DEFAULT_IMAGE_MODEL

SAMPLE = Path(__file__).resolve().parent.parent / "sample" / "grocery" / "images"
GROCERY_VAL = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "grocery" / "dataset"


def photos() -> list[Path]:
    found = sorted(SAMPLE.glob("*.jpg")) + sorted((SAMPLE / "corner-store").glob("*.jpg"))
    val = GROCERY_VAL / "val.txt"
    if val.is_file():
        lines = val.read_text().splitlines()[::10]
        found += [GROCERY_VAL / line.split(",")[0].lstrip("/") for line in lines if line]
    return [p for p in found if p.is_file()]


def rate(run: Callable[[np.ndarray], object], x: np.ndarray, batch: int = 8, rounds: int = 3) -> float:
    run(x[:batch])
    best = 0.0
    for _ in range(rounds):
        started = time.perf_counter()
        for i in range(0, len(x), batch):
            run(x[i : i + batch])
        best = max(best, len(x) / (time.perf_counter() - started))
    return best


def main() -> int:
    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    reference = load_image_encoder(DEFAULT_IMAGE_MODEL, "fp32")
    configured = load_image_encoder(DEFAULT_IMAGE_MODEL)
    assert isinstance(reference, TimmImageEncoder)
    paths = photos()
    order = np.random.default_rng(0).permutation(len(paths))
    pixels = torch.stack([reference.preprocess(Image.open(paths[i]).convert("RGB")) for i in order])
    calibration, judged = pixels[:64], pixels[64:]
    expected = reference.embed_tensors(judged)
    inputs = np.ascontiguousarray(reference._pixels.model_input(judged).numpy())
    speed_batch = (torch.rand(64, *reference.input_size) * 255).to(torch.uint8)
    lines = [
        f"{len(judged)} photos judged ({len(paths)} in all, 64 others calibrate int8); model alone, batch 8",
        "",
        "| runtime | images/s | x torch fp32 | x torch as configured | cosine to torch fp32: min / mean |",
        "| --- | --- | --- | --- | --- |",
    ]
    base = rate(lambda b: reference.embed_tensors(torch.from_numpy(b)), speed_batch.numpy())
    ours = rate(lambda b: configured.embed_tensors(torch.from_numpy(b)), speed_batch.numpy())
    own = configured.embed_tensors(judged)
    precision = getattr(configured, "precision", "fp32")
    cos = (expected * own).sum(axis=1)
    lines.append(f"| torch fp32 | {base:.0f} | 1.00 | - | 1 / 1 |")
    lines.append(f"| torch {precision} | {ours:.0f} | {ours / base:.2f} | 1.00 | {cos.min():.4f} / {cos.mean():.4f} |")
    with tempfile.TemporaryDirectory(prefix="bench-onnx-") as scratch:
        folder = Path(scratch)
        fp32 = OnnxImageEncoder(reference, folder)
        got = fp32.embed_tensors(judged)
        cos = (expected * got).sum(axis=1)
        speed = rate(lambda b: fp32.embed_tensors(torch.from_numpy(b)), speed_batch.numpy())
        lines.append(
            f"| ONNX Runtime fp32 | {speed:.0f} | {speed / base:.2f} | {speed / ours:.2f} | "
            f"{cos.min():.4f} / {cos.mean():.4f} |"
        )
        source = exported(reference, folder)
        convs = [n.name for n in onnx.load(str(source)).graph.node if n.op_type == "Conv"]
        calibrating = np.ascontiguousarray(reference._pixels.model_input(calibration).numpy())

        class Reader(CalibrationDataReader):  # type: ignore[misc]
            def __init__(self) -> None:
                self.batches = iter([{INPUT: calibrating[i : i + 8]} for i in range(0, len(calibrating), 8)])

            def get_next(self) -> dict[str, np.ndarray] | None:
                return next(self.batches, None)

        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        for label, exclude in (("int8, every conv", []), ("int8, stem and head conv in fp32", convs[:2] + convs[-1:])):
            target = folder / "int8.onnx"
            quantize_static(
                str(source), str(target), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, nodes_to_exclude=exclude,
            )  # fmt: skip
            session = ort.InferenceSession(str(target), options, providers=["CPUExecutionProvider"])
            rows = np.concatenate(
                [session.run([OUTPUT], {INPUT: inputs[i : i + 8]})[0] for i in range(0, len(inputs), 8)]
            )
            cos = (expected * rows).sum(axis=1)
            quick = np.ascontiguousarray(reference._pixels.model_input(speed_batch).numpy())

            def run(b: np.ndarray, s: ort.InferenceSession = session) -> object:
                return s.run([OUTPUT], {INPUT: b})

            speed = rate(run, quick)
            lines.append(
                f"| ONNX Runtime {label} | {speed:.0f} | {speed / base:.2f} | {speed / ours:.2f} | "
                f"{cos.min():.4f} / {cos.mean():.4f} |"
            )
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
