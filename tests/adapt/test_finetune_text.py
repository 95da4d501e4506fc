"""The fine-tuned text encoder (`python -m ingest adapt --modality text --method finetune`) on a real slice of
abt-buy's train pairs, the real MiniLM model and an embedded store.

The slice is 48 labelled abt -> buy pairs and, for each abt product, up to two buy products the split labels
as *not* the same (its siblings, which the mined negatives come from). The fine-tuning is given the first 32
pairs; the other products' queries judge it (it never read them). One short run (a capped number of steps)
trains every layer; the tests then check the stored version, the kept model folder, the catalogue's
re-embedded texts, the queries through a fresh engine, ingest under the active encoder, and rollback."""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from bench.prepare import labelled_pairs, parse_ditto_record
from bench.prepare import write_catalogue as write_feed
from ingest.__main__ import main as ingest_main
from retrieval.adapt.heads import AdapterError, Adapters, EncoderHead, load_kept_encoder
from retrieval.encoders import ImageEncoder, TextEncoder
from retrieval.records import payload_text
from retrieval.search import SearchEngine
from retrieval.settings import Settings
from retrieval.store import ProductStore
from retrieval.weights import folder_digest
from schemas.search import SearchFilters, SearchOptions
from tests.conftest import SHARED_DATA

CATALOGUE = "abt-slice"
PAIRS = 48  # labelled abt -> buy pairs of the train split
TAUGHT = 32  # of them, the pairs the fine-tuning is given; the others' queries judge it
SIBLINGS = 2  # per abt product, buy products labelled as not the same
LATE = 2  # pairs left out of the first ingest, ingested while the fine-tuned encoder is active
COLUMNS = ["id", "retailer", "title", "brand", "description"]
ENV_KEYS = ("QDRANT_URL", "IMAGE_MODEL", "TEXT_MODEL", "STORE_BACKEND", "DEFAULT_CATALOGUE", "MODELS_PATH")
# Two epochs capped at 4 steps (24 of the 32 pairs taught, batch 16; 8 held out for early stopping): it lifts
# the held-out anchors' recall@1 from 0.750 to 0.875, and that of the 16 products whose pair it never read
# (other shop, text ranking only) from 15/16 to 16/16.
RUN = ("--epochs", "2", "--max-steps", "4", "--batch-size", "16", "--max-length", "64", "--holdout", "0.25")
MIN_HELD_OUT = 0.75
MIN_UNSEEN_R1 = 0.9


@dataclass(frozen=True)
class Slice:
    root: Path
    store_path: Path
    models: Path
    feed: Path
    late: Path
    examples: Path
    queries: list[tuple[str, str, set[str]]]  # (abt id, its text, the buy ids that are the same)
    unseen: list[tuple[str, str, set[str]]]  # those of them whose pair the fine-tuning is never given
    late_ids: set[str]


def _record(retailer: str, ref: str, text: str) -> dict[str, str]:
    fields = parse_ditto_record(text)
    return {
        "id": ref,
        "retailer": retailer,
        "title": fields.get("name", ""),
        "brand": fields.get("manufacturer", ""),
        "description": fields.get("description", ""),
    }


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Slice:
    root = tmp_path_factory.mktemp("finetune-text")
    pairs = labelled_pairs(SHARED_DATA / "text-pairs" / "abt-buy", "train")
    ids: dict[tuple[str, str], str] = {}
    rows: dict[str, dict[str, str]] = {}

    def ref(retailer: str, text: str) -> str:
        if (retailer, text) not in ids:
            ids[(retailer, text)] = f"{retailer[0]}{len(ids)}"
            rows[ids[(retailer, text)]] = _record(retailer, ids[(retailer, text)], text)
        return ids[(retailer, text)]

    positives = [(a, b) for a, b, same in pairs if same][: PAIRS + LATE]
    lefts = {a for a, _ in positives}
    siblings: dict[str, list[str]] = {}
    for a, b, same in pairs:
        if not same and a in lefts and len(siblings.setdefault(a, [])) < SIBLINGS:
            siblings[a].append(b)
    matches: dict[str, set[str]] = {}
    for a, b in positives:
        matches.setdefault(ref("abt", a), set()).add(ref("buy", b))
        for sibling in siblings.get(a, []):
            ref("buy", sibling)
    late_ids = {ref("abt", a) for a, _ in positives[PAIRS:]} | {ref("buy", b) for _, b in positives[PAIRS:]}
    first = [r for key, r in rows.items() if key not in late_ids and r["title"]]
    write_feed(root / "feed.csv", first, COLUMNS)
    stored = {r["id"] for r in first}
    write_feed(root / "late.csv", [rows[key] for key in sorted(late_ids - stored)], COLUMNS)
    lines, queries = [], []
    for abt, buys in sorted(matches.items()):
        if abt not in stored:
            continue
        text = ". ".join(p for p in (rows[abt]["title"], rows[abt]["brand"], rows[abt]["description"]) if p)
        queries.append((abt, text, buys))
    unseen = queries[TAUGHT:]  # their pairs are not in the examples: the fine-tune never reads them
    for abt, _, buys in queries[:TAUGHT]:
        lines.append(json.dumps({"product": {"retailer": "abt", "id": abt}, "expect": sorted(buys)}))
    (root / "pairs.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert len(unseen) >= 12 and len(first) >= 120
    late_ids -= stored  # a late buy product that another abt product's pair brought in already
    return Slice(
        root,
        root / "store",
        root / "models",
        root / "feed.csv",
        root / "late.csv",
        root / "pairs.jsonl",
        queries,
        unseen,
        late_ids,
    )


@dataclass
class Run:
    """The slice ingested and fine-tuned through the CLI, and the raw search results taken before."""

    data: Slice
    output: str
    before: list[list[tuple[str, float]]]

    def cli(self, *args: str | Path) -> tuple[int, str]:
        """`python -m ingest ARGS` in-process: (exit code, stdout)."""
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            code = ingest_main([str(a) for a in args])
        return code, out.getvalue()

    @contextlib.contextmanager
    def store(self) -> Iterator[ProductStore]:
        """The embedded store is one process's: open it between CLI calls, never across one."""
        store = ProductStore.open(Settings(qdrant_path=self.data.store_path, store_backend="edge"))
        try:
            yield store
        finally:
            store.close()

    def engine(self, store: ProductStore, image_encoder: ImageEncoder, text_encoder: TextEncoder) -> SearchEngine:
        """A fresh engine over the store, as every process builds one: nothing loaded yet."""
        return SearchEngine(store, image_encoder, text_encoder, models_root=self.data.models)


def search_all(
    engine: SearchEngine, data: Slice, *, lexical: bool = False
) -> tuple[float, list[list[tuple[str, float]]]]:
    """Every abt product's text searched in the other shop: (recall@1, top-5 (id, score) per query)."""
    hits, ranking = 0, []
    options = SearchOptions(limit=5, ranks=False, lexical=lexical)
    for _, text, buys in data.queries:
        response = engine.search(CATALOGUE, text=text, filters=SearchFilters(exclude_retailer=["abt"]), options=options)
        ids = [(r.id, r.score) for r in response.results]
        hits += bool(ids) and ids[0][0] in buys
        ranking.append(ids)
    return hits / len(data.queries), ranking


@pytest.fixture(scope="module")
def run(data: Slice, image_encoder: ImageEncoder, text_encoder: TextEncoder) -> Iterator[Run]:
    with pytest.MonkeyPatch.context() as monkeypatch:
        for key in ENV_KEYS:
            monkeypatch.delenv(key, raising=False)
        monkeypatch.setenv("QDRANT_PATH", str(data.store_path))
        monkeypatch.setenv("MODELS_PATH", str(data.models))
        monkeypatch.setenv("STORE_BACKEND", "edge")
        state = Run(data, "", [])
        code, out = state.cli(data.feed, "--catalogue", CATALOGUE)
        assert code == 0, out
        with state.store() as store:
            _, state.before = search_all(state.engine(store, image_encoder, text_encoder), data)
        code, state.output = state.cli(
            "adapt",
            "--catalogue",
            CATALOGUE,
            "--modality",
            "text",
            "--method",
            "finetune",
            "--examples",
            data.examples,
            *RUN,
        )
        assert code == 0, state.output
        yield state


def _digest(run: Run) -> str:
    found = re.search(r"model ([0-9a-f]{64}) in ", run.output)
    assert found, run.output
    return found.group(1)


def test_cli_fine_tunes_and_switches_on_an_encoder_that_beats_the_base(run: Run) -> None:
    held = re.search(r"held-out recall@1 ([0-9.]+) -> ([0-9.]+) on (\d+) anchors", run.output)
    assert held, run.output
    before, after, anchors = float(held.group(1)), float(held.group(2)), int(held.group(3))
    print(f"\n{held.group(0)}")
    assert anchors >= 8
    assert after > before and after >= MIN_HELD_OUT, run.output
    assert "active: text queries are embedded by it" in run.output
    with run.store() as store:
        adapters = Adapters(store, models_root=run.data.models)
        (record,) = adapters.records(CATALOGUE)
        assert (record.kind, record.method, record.modality, record.version) == ("encoder", "finetune", "text", 1)
        assert record.model == _digest(run) and record.max_length == 64
        assert record.holdout is not None and record.holdout.after == pytest.approx(after, abs=1e-3)
        assert record.encoder == "sentence-transformers:all-MiniLM-L6-v2"
        assert store.info(CATALOGUE).adapters == {"text": 1}
        assert adapters.active_labels(CATALOGUE) == {"text": f"encoder v1 {record.model[:12]}"}
    code, listed = run.cli("adapt", "--catalogue", CATALOGUE, "--list")
    assert code == 0 and listed.startswith(f"* text v1: finetune encoder, condition product, {TAUGHT} examples"), listed
    assert f"model {_digest(run)[:12]}, 64 tokens" in listed


def test_the_model_folder_is_kept_by_digest_and_an_altered_copy_is_refused(run: Run, tmp_path: Path) -> None:
    digest = _digest(run)
    kept = run.data.models / digest
    assert (kept / "modules.json").is_file() and folder_digest(kept) == digest
    encoder = load_kept_encoder(run.data.models, digest)
    assert encoder.name == f"sentence-transformers:{digest}" and encoder.dim == 384
    shutil.copytree(kept, tmp_path / digest)
    config = tmp_path / digest / "sentence_bert_config.json"
    config.write_text(config.read_text(encoding="utf-8") + "\n", encoding="utf-8")  # one byte more
    with pytest.raises(AdapterError, match="altered"):
        load_kept_encoder(tmp_path, digest)
    with run.store() as store:  # what a process loading the record from that folder gets
        with pytest.raises(AdapterError, match="altered"):
            Adapters(store, models_root=tmp_path).load(CATALOGUE, "text", 1)
        with pytest.raises(AdapterError, match="is not in"):
            Adapters(store, models_root=tmp_path / "empty").load(CATALOGUE, "text", 1)


def test_activation_re_embeds_every_product_text_with_the_tuned_model(run: Run) -> None:
    encoder = load_kept_encoder(run.data.models, _digest(run))
    with run.store() as store:
        points = list(store.points(CATALOGUE, with_vectors=True))
    texts = [payload_text(p.payload or {}) for p in points]
    assert all(texts) and len(points) >= 120
    twins = np.asarray([p.vector["text_adapted"] for p in points if isinstance(p.vector, dict)], dtype=np.float32)
    raw = np.asarray([p.vector["text"] for p in points if isinstance(p.vector, dict)], dtype=np.float32)
    expected = encoder.embed_texts([t for t in texts if t])
    assert twins.shape == raw.shape == expected.shape == (len(points), 384)
    assert float(np.min(np.sum(twins * expected, axis=1))) >= 0.999  # the tuned model's vector of the stored text
    assert float(np.mean(np.sum(twins * raw, axis=1))) < 0.99  # not the base model's


def test_a_fresh_engine_loads_the_model_from_the_record_and_text_queries_use_it(
    run: Run, image_encoder: ImageEncoder, text_encoder: TextEncoder
) -> None:
    digest = _digest(run)
    with run.store() as store:
        engine = run.engine(store, image_encoder, text_encoder)
        model = engine.adapters.text_model(CATALOGUE)
        assert isinstance(model, EncoderHead) and model.digest == digest
        assert model.encoder.name == f"sentence-transformers:{digest}"
        _, ranking = search_all(engine, run.data)
        unseen = run.data.queries[TAUGHT:]  # products whose pair the fine-tuning never read
        after = sum(bool(r) and r[0][0] in q[2] for r, q in zip(ranking[TAUGHT:], unseen, strict=True))
        base = sum(bool(r) and r[0][0] in q[2] for r, q in zip(run.before[TAUGHT:], unseen, strict=True))
        print(f"\nunseen products' recall@1: {base}/{len(unseen)} -> {after}/{len(unseen)}")
        assert after / len(unseen) >= MIN_UNSEEN_R1 and after >= base, (base, after)
        abt, text, buys = run.data.queries[0]
        response = engine.search(CATALOGUE, text=text, filters=SearchFilters(exclude_retailer=["abt"]))
        assert response.adapted == {"text": 1} and response.modes == ["text", "lexical"]
        top = response.results[0]
        stored = store.product(CATALOGUE, top.retailer, top.id, with_vectors=True)
        vectors = stored.vector if isinstance(stored.vector, dict) else {}
        twin = np.asarray(vectors["text_adapted"], dtype=np.float32)
        assert top.scores.text == pytest.approx(float(twin @ model.embed_texts([text])[0]), abs=1e-4)
        # a stored product searches with its re-embedded text
        _, similar = engine.search_product(CATALOGUE, "abt", abt, filters=SearchFilters(exclude_retailer=["abt"]))
        assert similar.adapted == {"text": 1} and any(r.id in buys for r in similar.results[:5])


def test_rollback_restores_the_raw_results_exactly_and_use_switches_back(
    run: Run, image_encoder: ImageEncoder, text_encoder: TextEncoder
) -> None:
    code, out = run.cli("adapt", "--catalogue", CATALOGUE, "--modality", "text", "--rollback")
    assert code == 0 and "text head now none (raw vectors)" in out, out
    with run.store() as store:
        engine = run.engine(store, image_encoder, text_encoder)
        assert engine.adapters.text_model(CATALOGUE) is None
        _, after = search_all(engine, run.data)
    assert after == run.before
    code, out = run.cli("adapt", "--catalogue", CATALOGUE, "--modality", "text", "--use", "1")
    assert code == 0 and f"text head now encoder v1 {_digest(run)[:12]}" in out, out


def test_products_ingested_while_it_is_active_get_the_tuned_twin(run: Run) -> None:
    code, out = run.cli(run.data.late, "--catalogue", CATALOGUE)
    assert code == 0 and f"new {len(run.data.late_ids)}," in out, out
    encoder = load_kept_encoder(run.data.models, _digest(run))
    with run.store() as store:
        fresh = [
            p
            for p in store.points(CATALOGUE, with_vectors=True)
            if str((p.payload or {}).get("product_id")) in run.data.late_ids
        ]
    assert len(fresh) == len(run.data.late_ids) >= 2
    for point in fresh:
        vectors = point.vector if isinstance(point.vector, dict) else {}
        expected = encoder.embed_texts([payload_text(point.payload or {}) or ""])[0]
        assert float(np.asarray(vectors["text_adapted"], dtype=np.float32) @ expected) >= 0.999
