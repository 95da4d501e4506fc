"""`python -m bench backbones`: image-only exact-match quality per image/s for each available backbone."""

from __future__ import annotations

import time

import torch
from PIL import Image

from bench.evalset import EvalSet
from bench.quality import evaluate
from retrieval.encoders import ImageEncoder, TextEncoder, load_image_encoder

OFFLINE_BACKBONES = ("timm:tf_efficientnet_lite0", "timm:tf_efficientnet_lite1", "timm:tf_efficientnet_lite2")


def images_per_second(encoder: ImageEncoder, evalset: EvalSet, *, count: int = 64, batch: int = 32) -> float:
    """Decode + preprocess + forward for `count` of the set's query photos, in batches."""
    paths = [p for q in evalset.queries if (p := evalset.image_path(q))][:count]
    started = time.perf_counter()
    for start in range(0, len(paths), batch):
        tensors = []
        for path in paths[start : start + batch]:
            with Image.open(path) as image:
                tensors.append(encoder.preprocess(image.convert("RGB")))
        encoder.embed_tensors(torch.stack(tensors))
    return len(paths) / (time.perf_counter() - started)


def compare(specs: list[str], evalset: EvalSet, text_encoder: TextEncoder, *, max_queries: int | None = None) -> str:
    lines = [
        f"| backbone ({evalset.name}, image only) | dim | R@1 | R@5 | R@10 | MRR | images/s |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for spec in specs:
        encoder = load_image_encoder(spec)
        run = evaluate(evalset, encoder, text_encoder, max_queries=max_queries)
        (tally,) = [t for k, t in run.tallies.items() if k.mode == "image" and not k.filtered and k.group == "all"]
        s = tally.summary()
        speed = images_per_second(encoder, evalset)
        lines.append(
            f"| {encoder.name} | {encoder.dim} | {s['R@1']:.3f} | {s['R@5']:.3f} | {s['R@10']:.3f} | "
            f"{s['MRR']:.3f} | {speed:.1f} |"
        )
    return "\n".join(lines)
