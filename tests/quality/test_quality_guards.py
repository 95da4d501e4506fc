"""Minimum scores for the quality rows docs/BENCHMARKS.md claims, measured through the product's own code on
real data nobody tuned these thresholds on, so that a change that halves text, lexical, fused, calibrated or
adapted quality fails CI instead of passing it.

Each guard sits a few points under the figure measured on the same slice (noted beside it): the slack of a
different CPU's bf16 rounding, not of a regression. Queries always differ from what is stored: the other
shop's listing, or an in-store photo of a product whose catalogue holds only its web photo."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.adapt import Adapting
from bench.calibrate import measure, pairs_of
from bench.evalset import EvalSet, load_set
from bench.prepare import write_grocery_set, write_text_pairs_set
from bench.quality import ingested, recall_at, run_set
from bench.review import review_rounds
from retrieval.adapt.train import fit_supervised
from retrieval.encoders import ImageEncoder, TextEncoder
from retrieval.match.model import fit, labelled_candidates
from retrieval.search import SearchEngine
from retrieval.settings import Settings
from tests.conftest import GROCERY, SHARED_DATA

ABT_BUY = SHARED_DATA / "text-pairs" / "abt-buy"


@pytest.fixture(scope="module")
def abt_buy_test(
    tmp_path_factory: pytest.TempPathFactory, image_encoder: ImageEncoder, text_encoder: TextEncoder
) -> Iterator[tuple[EvalSet, SearchEngine]]:
    """Abt-Buy's test split (206 Abt listings, each searched for among the Buy listings), ingested."""
    folder = tmp_path_factory.mktemp("abt-buy")
    write_text_pairs_set(ABT_BUY, folder, left="abt", right="buy")
    evalset = load_set(folder)
    with ingested(evalset, image_encoder, text_encoder) as (engine, _):
        yield evalset, engine


def test_cross_shop_text_lexical_and_fused_recall(abt_buy_test: tuple[EvalSet, SearchEngine]) -> None:
    evalset, engine = abt_buy_test
    tallies = run_set(
        evalset,
        engine,
        evalset.name,
        fusions=("dbsf", "rrf"),
        only=("text", "lexical", "text+lexical"),
        filtered_rows=False,
    )
    text, lexical = recall_at(tallies, "text"), recall_at(tallies, "lexical")
    fused, ranked = recall_at(tallies, "text+lexical", "dbsf"), recall_at(tallies, "text+lexical", "rrf")
    assert text >= 0.85, text  # measured 0.874 with the code re-rank (0.772 without: MiniLM alone)
    assert lexical >= 0.91, lexical  # measured 0.932 with code terms (0.840 without)
    assert fused >= 0.93, fused  # measured 0.956 (DBSF, the default fusion; 0.864 before code terms)
    assert ranked >= 0.90, ranked  # measured 0.922 (RRF, with the conflict re-rank; 0.840 before)
    assert fused > max(text, lexical)  # the fusion earns its place


def test_calibrated_matches_on_unseen_cross_shop_pairs(
    abt_buy_test: tuple[EvalSet, SearchEngine], abt_buy_valid: tuple[EvalSet, SearchEngine]
) -> None:
    """The match model fitted on Abt-Buy's valid split, judged on its test split: products it never saw,
    among real siblings (same brand, neighbouring model numbers)."""
    fit_set, engine = abt_buy_valid
    calibration = fit(labelled_candidates(engine, fit_set.name, pairs_of(fit_set)), target_precision=0.95)
    assert calibration.reliable, calibration.curve  # the target is reached out-of-fold: 'match' is decided
    evalset, test_engine = abt_buy_test
    pairs = pairs_of(evalset)
    data = labelled_candidates(test_engine, evalset.name, pairs, depth=calibration.depth, fusion=calibration.fusion)
    result = measure(calibration, data, len(pairs))
    assert result["r1_model"] >= 0.955, result  # measured 0.981 with the reverse rank (search order 0.966)
    assert result["r1_model"] > result["r1_search"], result
    assert result["precision"] >= 0.97, result  # measured 0.990 at the 0.95 target (0.980 before one match per shop)
    assert result["recall"] >= 0.915, result  # measured 0.943
    assert result["uncertain"] > 0, result  # the middle band is used: not every candidate is match / no match


AMAZON_GOOGLE = SHARED_DATA / "text-pairs" / "amazon-google"


def _amazon_google(
    split: str, tmp_path_factory: pytest.TempPathFactory, image_encoder: ImageEncoder, text_encoder: TextEncoder
) -> Iterator[tuple[EvalSet, SearchEngine]]:
    folder = tmp_path_factory.mktemp(f"amazon-google-{split}")
    write_text_pairs_set(AMAZON_GOOGLE, folder, left="amazon", right="google", split=split)
    evalset = load_set(folder)
    with ingested(evalset, image_encoder, text_encoder) as (engine, _):
        yield evalset, engine


@pytest.fixture(scope="module")
def amazon_google_test(
    tmp_path_factory: pytest.TempPathFactory, image_encoder: ImageEncoder, text_encoder: TextEncoder
) -> Iterator[tuple[EvalSet, SearchEngine]]:
    """Amazon-Google's test split (227 Amazon listings among both shops' 2,293 pairs), ingested: no constant of
    the lexical signal, the fusion or the match model was chosen on this set; software titles whose siblings
    differ by one word."""
    yield from _amazon_google("test", tmp_path_factory, image_encoder, text_encoder)


def test_held_out_cross_shop_text_recall(amazon_google_test: tuple[EvalSet, SearchEngine]) -> None:
    evalset, engine = amazon_google_test
    tallies = run_set(evalset, engine, evalset.name, fusions=("dbsf",), only=("text+lexical",), filtered_rows=False)
    fused = recall_at(tallies, "text+lexical", "dbsf")
    assert fused >= 0.82, fused  # measured 0.846


def test_calibrated_matches_on_held_out_software_titles(
    amazon_google_test: tuple[EvalSet, SearchEngine],
    tmp_path_factory: pytest.TempPathFactory,
    image_encoder: ImageEncoder,
    text_encoder: TextEncoder,
) -> None:
    """The match model fitted on Amazon-Google's valid split, judged on its test split (`python -m bench
    calibrate`'s row): editions, versions and upgrades of one title are the siblings to tell apart."""
    for fit_set, engine in _amazon_google("valid", tmp_path_factory, image_encoder, text_encoder):
        calibration = fit(labelled_candidates(engine, fit_set.name, pairs_of(fit_set)), target_precision=0.95)
    assert calibration.reliable, calibration.curve
    evalset, test_engine = amazon_google_test
    pairs = pairs_of(evalset)
    data = labelled_candidates(test_engine, evalset.name, pairs, depth=calibration.depth, fusion=calibration.fusion)
    result = measure(calibration, data, len(pairs))
    assert result["r1_model"] >= 0.87 and result["r1_model"] > result["r1_search"], result  # measured 0.899 (0.846)
    assert result["precision"] >= 0.94, result  # measured 0.966 at the 0.95 target
    assert result["recall"] >= 0.52, result  # measured 0.548 (0.552 before one match per shop)


def test_an_adaptation_head_lifts_image_recall_by_a_margin(
    tmp_path_factory: pytest.TempPathFactory, image_encoder: ImageEncoder, text_encoder: TextEncoder
) -> None:
    """A head fitted on a third of Grocery's train photos (never on val) lifts val photo -> product R@1."""
    root = tmp_path_factory.mktemp("adapt-guard")
    write_grocery_set(GROCERY, root / "grocery-val", "val")
    train = root / "grocery-train"
    write_grocery_set(GROCERY, train, "train")
    lines = (train / "queries.jsonl").read_text(encoding="utf-8").splitlines()
    (train / "queries.jsonl").write_text("\n".join(lines[::3]) + "\n", encoding="utf-8")  # every class kept
    evalset = load_set(root / "grocery-val")
    settings = Settings()
    with ingested(evalset, image_encoder, text_encoder, settings=settings) as (engine, _):
        before = recall_at(run_set(evalset, engine, evalset.name, only=("image",), filtered_rows=False), "image")
        adapting = Adapting.of(engine, evalset.name, train, settings, cache=root / "cache")
        # Held out by product, the head must help products it never saw a photo of: it does not, so the epoch
        # kept is the identity (measured 0.238 -> 0.238 on 130 photos of unseen products).
        unseen = fit_supervised(adapting.examples)
        assert unseen.best == 0 and unseen.after == unseen.before, (unseen.before, unseen.after, unseen.best)
        # Held out photo by photo (new photos of labelled products: what val's photos are), it learns.
        adapting.switch_to(fit_supervised(adapting.examples, held_out_by="example"), "supervised")
        after = recall_at(run_set(evalset, engine, evalset.name, only=("image",), filtered_rows=False), "image")
    assert before >= 0.36, before  # measured 0.402 without a head
    assert after >= before + 0.15, (before, after)  # BENCHMARKS: +0.37 with all 2640 train photos (here a third)


def test_slices_are_what_the_guards_say(tmp_path: Path) -> None:
    """The guards above hold only while their slices are the documented ones."""
    assert write_text_pairs_set(ABT_BUY, tmp_path / "t", left="abt", right="buy") == 206
    assert write_grocery_set(GROCERY, tmp_path / "v", "val") == 296


def test_review_answers_keep_decisions_at_target_on_unseen_products(
    abt_buy_test: tuple[EvalSet, SearchEngine], abt_buy_valid: tuple[EvalSet, SearchEngine], tmp_path: Path
) -> None:
    """The review loop as `python -m bench review` runs it (a reviewer answering the queue from the truth, 40
    answers a round, training after each), on Abt-Buy's valid split, judged on its test split; the shipped
    default model, which learnt from Abt-Buy's train split only, decides before."""
    fit_set, engine = abt_buy_valid
    evalset, test_engine = abt_buy_test
    rounds = review_rounds(
        "queue", engine, fit_set, test_engine, evalset, tmp_path, rounds=2, per_round=40, seed=0, progress=print
    )
    last = rounds[-1]
    print(rounds)
    # 40 answers: the catalogue's model acted better than the default on the answered products (by folds) and
    # replaced it; 80: the one fitted then did not beat the default (0.939 / 0.738 against 0.919 / 0.810 by
    # folds), which decides again
    assert rounds[0].model == "catalogue" and rounds[0].precision >= 0.94, rounds[0]  # measured 0.966 / 0.948
    assert last.answers == 80 and last.model in ("catalogue", "default"), last
    assert last.precision >= 0.97, last  # measured 1.000
    assert last.recall >= 0.89, last  # measured 0.919 (the default alone, before any answer, too)
