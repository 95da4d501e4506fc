"""A timm image backbone run by ONNX Runtime: the same weights, exported once, at the hardware's pace.

The torch model (`TimmImageEncoder`, batch norms folded) stays the reference, and what training, image tails
and everything else that needs its modules use; this class only replaces the forward of `embed_tensors`. The
export (torch's ONNX exporter, batch size dynamic) is cached as `<digest>.onnx` in a folder given by the
caller (`MODELS_PATH/onnx` for the service and the CLI), the digest taken over the exporter's version, the
model's name and every weight, so another checkpoint never meets a stale file. At load, the session's rows
are checked against the torch float32 forward on a probe batch: below PROBE_COSINE the encoder refuses to
load, so that a catalogue never holds vectors of two runtimes that disagree. With that check the encoder's
name (the catalogue's fingerprint) is the torch one: the vectors are interchangeable, as bf16's are.

ONNX Runtime runs the model in float32: on this project's 2-core CPU (AVX512-BF16) it embeds photos 1.7-2x as
fast as torch in float32 in batches of 8, and about as fast as torch in bf16 (0.78-1.13x over runs); in the
service, beside the text model's torch thread, it served 1.28-1.36x the searches of torch bf16. So
`INFERENCE=auto` picks it in the service and where torch would run float32, torch bf16 for batch ingest
(`python -m bench speed ingest|serve`, `python -m bench.onnx_int8`, docs/BENCHMARKS.md).

Static int8 quantization (QDQ, per channel, calibrated on real photos, stem and head kept in float32) was
measured 2.1-2.4x torch bf16, but its rows fell to cosine 0.989 of float32 on grocery photos, below the 0.995
every photo must keep: not offered."""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch

from retrieval.encoders.base import EncoderError
from retrieval.encoders.timm_backbone import TimmImageEncoder

log = logging.getLogger("retrieval.encoders")

EXPORT_VERSION = 1  # changes when the exported graph changes (inputs, outputs, opset)
OPSET = 18
PROBE_COSINE = 0.9999  # the worst probe row against torch float32
INPUT, OUTPUT = "pixels", "embedding"


class _Embedding(torch.nn.Module):
    """What is exported: normalised input in, the L2-normalised pooled features out."""

    def __init__(self, model: Any) -> None:  # a timm model: forward_features, forward_head
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        features = self.model.forward_features(pixels)
        pooled = self.model.forward_head(features, pre_logits=True)
        return torch.nn.functional.normalize(pooled, dim=-1)


def export_digest(reference: TimmImageEncoder) -> str:
    digest = hashlib.sha256(f"{EXPORT_VERSION}|{OPSET}|{torch.__version__}|{reference.name}".encode())
    for name, tensor in sorted(reference.model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()


def exported(reference: TimmImageEncoder, folder: Path) -> Path:
    """The reference model's ONNX file in `folder` (exported now, atomically, when missing)."""
    path = folder / f"{export_digest(reference)}.onnx"
    if path.is_file():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    probe = torch.zeros((2, *reference.input_size))
    batch = torch.export.Dim("batch", min=1, max=4096)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".export-") as scratch:
        target = Path(scratch) / "model.onnx"
        with torch.no_grad():
            torch.onnx.export(
                _Embedding(reference.model).eval(),
                (probe,),
                str(target),
                input_names=[INPUT],
                output_names=[OUTPUT],
                dynamic_shapes={"pixels": {0: batch}},
                opset_version=OPSET,
                dynamo=True,
                external_data=False,
                verbose=False,
            )
        os.replace(target, path)
    log.info("exported %s to ONNX: %s", reference.name, path.name)
    return path


class OnnxImageEncoder:
    """`reference`'s embeddings computed by an ONNX Runtime session (float32, every core of the process's
    torch thread count). Everything but `embed_tensors` is the reference's."""

    def __init__(self, reference: TimmImageEncoder, folder: Path) -> None:
        import onnxruntime as ort

        self.reference = reference
        self.name = reference.name
        self.dim = reference.dim
        self.runtime = "onnx"
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # no busy-waiting between runs: the decode threads of an ingest need those cores
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            path = exported(reference, folder)
            self._session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # the exporter's and the runtime's own errors are many kinds
            raise EncoderError(f"cannot run {reference.name} on ONNX Runtime ({exc}); set INFERENCE=torch") from exc
        self._lock = threading.Lock()
        self.agreement = self._check()

    def _check(self) -> float:
        generator = torch.Generator().manual_seed(0)
        probe = (torch.rand((4, *self.reference.input_size), generator=generator) * 255).to(torch.uint8)
        reference = self.reference
        with torch.inference_mode():  # the module that was exported, in torch float32
            expected = _Embedding(reference.model)(reference._model_input(probe)).numpy()
        worst = float((expected * self.embed_tensors(probe)).sum(axis=1).min())
        if worst < PROBE_COSINE:
            raise EncoderError(
                f"{reference.name} on ONNX Runtime disagrees with torch (cosine {worst:.5f} < {PROBE_COSINE}); "
                "set INFERENCE=torch"
            )
        return worst

    def preprocess(self, image: Any) -> torch.Tensor:
        return self.reference.preprocess(image)

    def embed_tensors(self, batch: torch.Tensor) -> np.ndarray:
        pixels = self.reference._pixels.model_input(batch).contiguous().numpy()
        with self._lock:  # one run at a time: the session already uses every thread for one batch
            rows = self._session.run([OUTPUT], {INPUT: np.ascontiguousarray(pixels, dtype=np.float32)})[0]
        return np.asarray(rows, dtype=np.float32)

    def __getattr__(self, name: str) -> Any:  # the model, its precision, `classify`, ...: the reference's
        if name == "reference":
            raise AttributeError(name)
        return getattr(self.reference, name)
