"""`python -m bench.onnx_text`: the text encoder (all-MiniLM-L6-v2) on ONNX Runtime, float32 and dynamic int8,
against torch float32 and torch as configured (bf16 autocast on a CPU with AVX512-BF16).

Rows: texts/s of the encoder alone on 1,024 Abt-Buy listings (titles and descriptions, as ingest embeds them),
in batches of 64 sorted by length as sentence-transformers does, and each runtime's cosine to torch float32
(worst and mean row). ONNX is the whole sentence-transformers forward (transformer, mean pooling,
normalisation) exported by torch's exporter with batch and length dynamic; int8 is ONNX Runtime's dynamic
quantization (weights per channel). The product would run text on ONNX Runtime only where it beats torch as
configured and keeps cosine >= 0.995 for every row (issue 30)."""

from __future__ import annotations

import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from retrieval.encoders.sentence import SentenceTextEncoder

SETS = Path(__file__).resolve().parent / "out" / "sets"
TEXTS = 1024
BATCH = 64
INPUTS = ("input_ids", "attention_mask", "token_type_ids")


class _Sentence(torch.nn.Module):
    """What is exported: token ids in, the normalised sentence embedding out."""

    def __init__(self, model: Any) -> None:  # a SentenceTransformer
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor) -> Any:
        features = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
        return self.model(features)["sentence_embedding"]


def texts() -> list[str]:
    path = SETS / "abt-buy" / "queries.jsonl"
    if not path.is_file():
        raise SystemExit(f"{path} is missing: run `python -m bench prepare` first")
    found = [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines() if line]
    return (found * (TEXTS // len(found) + 1))[:TEXTS]


def export(encoder: SentenceTextEncoder, folder: Path) -> Path:
    model = encoder.model
    probe = model.tokenizer(["a probe", "two probes here"], padding=True, return_tensors="pt")
    batch, length = torch.export.Dim("batch", min=1, max=4096), torch.export.Dim("length", min=1, max=512)
    path = folder / "minilm.onnx"
    with torch.no_grad():
        torch.onnx.export(
            _Sentence(model).eval(),
            tuple(probe[name] for name in INPUTS),
            str(path),
            input_names=list(INPUTS),
            output_names=["sentence_embedding"],
            dynamic_shapes={name: {0: batch, 1: length} for name in INPUTS},
            opset_version=18,
            dynamo=True,
            external_data=False,
            verbose=False,
        )
    return path


def session(path: Path) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def onnx_embedder(encoder: SentenceTextEncoder, path: Path) -> Callable[[list[str]], np.ndarray]:
    run_session, tokenizer = session(path), encoder.model.tokenizer
    limit = encoder.model.max_seq_length

    def embed(batch_texts: list[str]) -> np.ndarray:
        order = np.argsort([-len(t) for t in batch_texts], kind="stable")
        rows = []
        for start in range(0, len(order), BATCH):
            part = [batch_texts[i] for i in order[start : start + BATCH]]
            tokens = tokenizer(part, padding=True, truncation=True, max_length=limit, return_tensors="np")
            feed = {name: tokens[name].astype(np.int64) for name in INPUTS}
            rows.append(run_session.run(["sentence_embedding"], feed)[0])
        out = np.empty((len(batch_texts), encoder.dim), dtype=np.float32)
        out[order] = np.vstack(rows)
        unit: np.ndarray = out / np.linalg.norm(out, axis=1, keepdims=True)
        return unit

    return embed


def fastest(run: Callable[[], np.ndarray], rounds: int = 3) -> tuple[float, np.ndarray]:
    best, rows = float("inf"), np.zeros(0)
    for _ in range(rounds):
        started = time.perf_counter()
        rows = run()
        best = min(best, time.perf_counter() - started)
    return best, rows


def main() -> int:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    corpus = texts()
    encoder = SentenceTextEncoder("all-MiniLM-L6-v2", precision="fp32")
    configured = SentenceTextEncoder("all-MiniLM-L6-v2", precision="auto")
    results: dict[str, tuple[float, np.ndarray]] = {}
    results["torch fp32"] = fastest(lambda: encoder.embed_texts(corpus))
    results[f"torch {configured.precision} (as configured)"] = fastest(lambda: configured.embed_texts(corpus))
    with tempfile.TemporaryDirectory(prefix="onnx-text-") as folder:
        exported = export(encoder, Path(folder))
        quantized = Path(folder) / "minilm-int8.onnx"
        quantize_dynamic(str(exported), str(quantized), weight_type=QuantType.QInt8, per_channel=True)
        for name, path in (("ONNX Runtime fp32", exported), ("ONNX Runtime int8 (dynamic)", quantized)):
            embed = onnx_embedder(encoder, path)
            results[name] = fastest(lambda embed=embed: embed(corpus))  # type: ignore[misc]
    reference = results["torch fp32"][1]
    baseline = results[f"torch {configured.precision} (as configured)"][0]
    print("| runtime | texts/s | x torch as configured | cosine to torch fp32: worst / mean |")
    print("| --- | --- | --- | --- |")
    for name, (seconds, rows) in results.items():
        cosine = (rows * reference).sum(axis=1)
        print(
            f"| {name} | {len(corpus) / seconds:.1f} | {baseline / seconds:.2f} | "
            f"{cosine.min():.5f} / {cosine.mean():.5f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
