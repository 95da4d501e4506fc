"""`python -m bench.text_precision [--out DIR]`: the text encoder in float32 and under bfloat16 autocast
on real product records (the first of abt-buy's test pairs, name + description + price as one text
each) and on their titles alone, side by side in one run: ms per text at the ingest batch (64) and at
batch 1 (a query), and the cosine of every bf16 embedding to its float32 one."""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from bench import emit
from retrieval.encoders.base import cpu_has_bf16
from retrieval.encoders.sentence import SentenceTextEncoder
from retrieval.settings import DEFAULT_TEXT_MODEL


def records(shared: Path, limit: int) -> list[str]:
    texts = []
    for line in (shared / "text-pairs" / "abt-buy" / "test.txt").read_text(encoding="utf-8").splitlines():
        texts += [part.replace("COL ", "").replace(" VAL ", ": ") for part in line.split("\t")[:2]]
    return texts[:limit]


def ms_per_text(encoder: SentenceTextEncoder, texts: list[str], batch: int, rounds: int = 3) -> float:
    encoder.embed_texts(texts[:batch])
    runs = []
    for _ in range(rounds):
        started = time.perf_counter()
        for i in range(0, len(texts), batch):
            encoder.embed_texts(texts[i : i + batch])
        runs.append((time.perf_counter() - started) * 1000 / len(texts))
    return statistics.median(runs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.text_precision", description=__doc__)
    parser.add_argument("--shared", type=Path, default=Path("../shared/data"))
    parser.add_argument("--texts", type=int, default=1024)
    parser.add_argument("--out", type=Path, help="also write text-precision.md here")
    args = parser.parse_args(argv)
    model = DEFAULT_TEXT_MODEL.partition(":")[2]
    fp32 = SentenceTextEncoder(model, precision="fp32")
    bf16 = SentenceTextEncoder(model, precision="bf16")
    long_texts = records(args.shared, args.texts)
    titles = [text.split(" description:")[0] for text in long_texts]
    lines = [
        f"CPU computes bf16 natively: {cpu_has_bf16()} (TEXT_PRECISION=auto picks bf16 only then)",
        "",
        "| texts | batch | fp32 ms/text | bf16 ms/text | speed-up | min cosine | mean cosine |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for label, texts in (("product records", long_texts), ("titles only", titles)):
        cosines = np.sum(fp32.embed_texts(texts) * bf16.embed_texts(texts), axis=1)
        for batch, subset in ((64, texts), (1, texts[:128])):
            slow, fast = ms_per_text(fp32, subset, batch), ms_per_text(bf16, subset, batch)
            lines.append(
                f"| {label} ({len(texts)}) | {batch} | {slow:.2f} | {fast:.2f} | {slow / fast:.2f}x | "
                f"{cosines.min():.6f} | {cosines.mean():.6f} |"
            )
    emit("\n".join(lines), args.out, "text-precision.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
