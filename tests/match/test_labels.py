"""What labels say and how they are checked (issue 28): positives, labelled non-matches (`reject`), products with
no counterpart (`expect: []`), labels naming a retailer, unknown keys refused by line, and labels a model cannot
be fitted on refused with the problem named (exit 2), on real sibling products of two shops."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from bench.calibrate import pairs_of
from bench.evalset import EvalSet
from ingest.__main__ import main as ingest_main
from retrieval.match.model import (
    FEATURES,
    Labelled,
    LabelsError,
    check_enough,
    check_labels,
    find_matches,
    labelled_candidates,
)
from retrieval.match.rerank import PairSet, train_cross_encoder
from retrieval.match.training import report_share, split_labels, train_matching
from retrieval.search import SearchEngine
from schemas.payload import Product
from schemas.search import LabelledPair, ProductRef
from tests.conftest import sample_rows


def line(product: str, **labels: object) -> str:
    return json.dumps({"product": {"retailer": "hemkop", "id": product}, **labels})


def test_a_label_line_says_same_different_or_no_counterpart() -> None:
    closed = LabelledPair.model_validate_json(line("5", expect=["o-5"], reject=["o-6"]))
    assert closed.label("other-shop", "o-5") is True and closed.label("x", "o-5") is True
    assert closed.label("other-shop", "o-6") is False and closed.label("other-shop", "o-7") is False  # closed world
    alone = LabelledPair.model_validate_json(line("5", expect=[]))
    assert alone.label("other-shop", "o-5") is False and alone.positives == 0  # no counterpart: all are not it
    judged = LabelledPair.model_validate_json(line("5", reject=[{"retailer": "other-shop", "id": "o-6"}]))
    assert judged.label("other-shop", "o-6") is False and judged.label("third", "o-6") is None
    assert judged.label("other-shop", "o-5") is None  # not labelled: not used
    named = LabelledPair.model_validate_json(line("5", expect=[{"retailer": "other-shop", "id": "o-5"}]))
    assert named.label("other-shop", "o-5") is True and named.label("third-shop", "o-5") is False
    for bad, message in (
        (line("5", expect=["o-5"], rejects=["o-6"]), "Extra inputs are not permitted"),
        (line("5"), 'give "expect"'),
        (line("5", expect=["o-5"], reject=["o-5"]), "both expected and rejected"),
    ):
        with pytest.raises(ValidationError, match=message):
            LabelledPair.model_validate_json(bad)


def test_rejects_alone_label_only_themselves(engine: SearchEngine, two_shops: str) -> None:
    closed = labelled_candidates(engine, two_shops, [LabelledPair.model_validate_json(line("5", expect=["o-5"]))])
    assert sum(closed.labels) == 1 and len(closed.labels) == 20  # every candidate labelled
    _, found = find_matches(engine, two_shops, "hemkop", "5", calibration=None, limit=5)
    siblings = [m.id for m in found if m.id != "o-5"][:2]
    open_ = labelled_candidates(engine, two_shops, [LabelledPair.model_validate_json(line("5", reject=siblings))])
    assert open_.labels == [False, False] and open_.positives == 0  # only what a person judged


def test_one_sided_labels_are_refused_before_scikit_learn_sees_them() -> None:
    """Five products whose true pairs all belong to one product: folds without a positive product."""
    rows = [[0.1] * len(FEATURES)] * 50
    labels = [i < 6 for i in range(50)]  # six true pairs, all of product 0
    groups = [0] * 10 + [i // 10 for i in range(10, 50)]
    with pytest.raises(LabelsError, match="too one-sided: 1 labelled products have a true pair"):
        check_enough(Labelled(rows, labels, groups, 6))


def test_labels_that_do_not_fit_the_catalogue_are_named(engine: SearchEngine, two_shops: str) -> None:
    good = [LabelledPair(product=ProductRef(retailer="hemkop", id=r["id"]), expect=[f"o-{r['id']}"]) for r in
            sample_rows(6)]  # fmt: skip
    check_labels(engine.store, two_shops, good)
    cases = [
        (LabelledPair(product=ProductRef(retailer="hemkop", id="nope"), expect=["o-5"]), "hemkop/nope is not in"),
        (LabelledPair(product=ProductRef(retailer="hemkop", id="5"), expect=["gone"]), "'gone' is in no other"),
        (LabelledPair(product=ProductRef(retailer="hemkop", id="5"), expect=["6"]), "(only in the product's own)"),
        (
            LabelledPair(product=ProductRef(retailer="hemkop", id="5"), expect=[ProductRef(retailer="hemkop", id="6")]),
            "is in the product's own retailer",
        ),
    ]
    for pair, message in cases:
        with pytest.raises(LabelsError, match=message.replace("(", r"\(").replace(")", r"\)")):
            check_labels(engine.store, two_shops, [*good, pair])
    with pytest.raises(LabelsError, match="3 labelled products: at least 5"):
        check_labels(engine.store, two_shops, good[:3])
    nothing = [LabelledPair(product=p.product, expect=[]) for p in good]
    with pytest.raises(LabelsError, match="no labelled product has a counterpart"):
        check_labels(engine.store, two_shops, nothing)


def test_calibrate_names_the_bad_line_and_the_bad_label(cli_shops: Path, capsys: pytest.CaptureFixture[str]) -> None:
    labelled = cli_shops / "pairs.jsonl"
    rows = [line(r["id"], expect=[f"o-{r['id']}"]) for r in sample_rows(12)]
    labelled.write_text("\n".join([*rows[:3], line("5", expect=["o-5"], colour="red"), *rows[3:]]) + "\n")
    assert ingest_main(["calibrate", str(labelled), "--catalogue", "shops"]) == 2
    assert "line 4: colour: Extra inputs are not permitted" in capsys.readouterr().err
    labelled.write_text("\n".join([*rows, line("5", expect=["o-5", "o-999"])]) + "\n")
    assert ingest_main(["calibrate", str(labelled), "--catalogue", "shops"]) == 2
    assert "hemkop/5: id 'o-999' is in no other retailer" in capsys.readouterr().err
    # labelled non-matches beside the positives, and a product judged against one listing only: all used
    judged = [line("9", expect=["o-9"], reject=["o-8"]), line("10", reject=["o-0", "o-1"])]
    labelled.write_text("\n".join([*rows[:9], *judged]) + "\n")
    assert ingest_main(["calibrate", str(labelled), "--catalogue", "shops"]) == 0
    assert "calibrated on 11 products" in capsys.readouterr().out


def test_train_chooses_on_held_out_products_then_refits_on_all_labels(
    abt_buy_valid: tuple[EvalSet, SearchEngine], tmp_path: Path
) -> None:
    """`ingest train`'s match model, without a cross-encoder: judged on a share held out by product, then the
    configuration chosen is refitted on every labelled product (its candidates all in the stored model)."""
    evalset, engine = abt_buy_valid
    pairs = pairs_of(evalset)
    shares = split_labels(pairs, held_out=0.2, seed=0)
    assert {p.product.id for p in shares.held}.isdisjoint({p.product.id for p in shares.fit + shares.rerank})
    result = train_matching(engine, evalset.name, shares, active=None, models_root=tmp_path, rerank=False)
    assert result.chosen is not None and result.chosen_label == "match model"
    choose, report = report_share(shares.held)
    assert len(report) >= 20 and {p.product.id for p in report}.isdisjoint({p.product.id for p in choose})
    learnt_from = labelled_candidates(engine, evalset.name, [p for p in pairs if p not in report])
    assert result.chosen.candidates == len(learnt_from.labels) > len(shares.fit) * 10  # all but the report share
    assert result.after.r1 >= result.before.r1 - 1 / len(choose)  # never below the search order
    assert result.chosen.reliable and "refit on all labels" in result.seconds
    searched, stored = result.reported  # on products neither the choice nor the refit read
    assert stored.products == searched.products == len(report) and stored.r1 >= searched.r1 - 0.05


def test_a_cross_encoder_that_cannot_be_judged_is_not_trained(tmp_path: Path) -> None:
    """Early-stopping pairs of one kind score every epoch 0: the untrained model would be kept without a word."""
    product = Product(id="1", retailer="a", title="Panasonic KX-TG6313S cordless phone")
    sibling = Product(id="2", retailer="b", title="Panasonic KX-TG9332S cordless phone")
    teaching = PairSet()
    for group in range(6):
        teaching.add(product, product, True, group)
        teaching.add(product, sibling, False, group)
    judged_by_one_kind = PairSet()
    judged_by_one_kind.add(product, sibling, False, 9)
    with pytest.raises(ValueError, match="all of one kind"):
        train_cross_encoder(teaching, tmp_path / "model", held_out=judged_by_one_kind)
    assert not (tmp_path / "model").exists()
