"""`python -m bench.fold_bn [--images N] [--out DIR]`: the default image backbone with its batch norms as
trained and folded into the convolutions (`retrieval/encoders/timm_backbone.py: fold_batch_norms`), in
float32 and bf16 (and, in bf16, with the linear projections' norms folded too, which the encoder does not
do), side by side in alternating rounds on the same grocery photos: images/s at the ingest
batch size (model only, pre-processed pixels), and every embedding's cosine to the unfolded float32 one."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench import emit
from bench.speed import Row, photos
from retrieval.encoders.base import cpu_has_bf16
from retrieval.encoders.factory import parse_spec
from retrieval.encoders.timm_backbone import TimmImageEncoder, fold_batch_norms
from retrieval.settings import Settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fold_bn", description=__doc__)
    parser.add_argument("--shared", type=Path, default=Path("../shared/data"))
    parser.add_argument("--images", type=int, default=1024, help="grocery photos (every other one, train then val)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, help="also write fold-bn.md here")
    args = parser.parse_args(argv)
    settings = Settings()
    kind, model, weights = parse_spec(settings.image_model)
    if kind != "timm":
        raise SystemExit(f"IMAGE_MODEL={settings.image_model}: batch-norm folding applies to timm backbones")
    batch = settings.batch_size
    variants = {
        f"{precision}, norms {'folded' if fold else 'as trained'}": TimmImageEncoder(
            model, weights, precision, fold=fold
        )
        for precision in ("fp32", "bf16")
        for fold in (False, True)
    }
    everything = TimmImageEncoder(model, weights, "bf16", fold=False)
    with torch.no_grad():  # what the encoder leaves out: the norms of the linear projections folded too
        fold_batch_norms(everything.model, linear=True)
    variants["bf16, all norms folded (projections too)"] = everything
    reference = variants["fp32, norms as trained"]
    sample = photos(args.shared)[::2][: args.images]
    pixels = torch.stack([reference.preprocess(Image.open(p).convert("RGB")) for p in sample])

    def embed(encoder: TimmImageEncoder) -> np.ndarray:
        return np.concatenate([encoder.embed_tensors(pixels[i : i + batch]) for i in range(0, len(pixels), batch)])

    expected = embed(reference)
    rows = {name: Row(name, len(sample), []) for name in variants}
    cosines: dict[str, np.ndarray] = {}
    for _ in range(args.rounds):  # alternating: a slower minute of the machine hits every variant
        for name, encoder in variants.items():
            started = time.perf_counter()
            vectors = embed(encoder)
            rows[name].rounds.append(time.perf_counter() - started)
            cosines[name] = np.sum(vectors * expected, axis=1)
    lines = [
        f"{settings.image_model}, {len(sample)} grocery photos, batch {batch}, "
        f"{torch.get_num_threads()} torch threads, CPU computes bf16 natively: {cpu_has_bf16()}; "
        f"{args.rounds} alternating rounds, median shown",
        "",
        "| variant | images/s | images/s of each round | min cosine | mean cosine |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, row in rows.items():
        lines.append(
            f"| {name} | {row.rate:.1f} | {row.spread} | {cosines[name].min():.6f} | {cosines[name].mean():.6f} |"
        )
    emit("\n".join(lines), args.out, "fold-bn.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
