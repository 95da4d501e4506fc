"""`python -m bench transfer`: the default match model, trained on public labelled pairs and judged on data of
another source (cross-dataset), then written to `retrieval/match/default_model.json`.

Each set's catalogue (both retailers of its split) is ingested into a throw-away store, each labelled product's
candidates found by the search as `/matches` finds them, and the transfer features (TRANSFER_FEATURES) read off
them. A model fitted on one set's train split is judged on the other sets' test splits, which nothing was
chosen on; the shipped model is fitted on every train split together, and its target precision is the one the
cross-dataset rows support."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bench.calibrate import measure, pairs_of
from bench.evalset import load_set
from bench.quality import ingested
from retrieval.encoders import ImageEncoder, TextEncoder
from retrieval.match.default import DEFAULT_MODEL_FILE, write_default_model
from retrieval.match.model import TRANSFER_FEATURES, Labelled, fit_model, labelled_candidates

TRAIN_SETS = ("abt-buy-train", "amazon-google-train", "beer-train", "itunes-amazon-train")
JUDGE_SETS = ("abt-buy", "amazon-google")  # the two product test splits (abt-buy: abt-buy's test split)
VALID_SETS = ("abt-buy-valid", "amazon-google-valid")  # read by no fitting: the shipped model judged there too


@dataclass
class Candidates:
    name: str
    data: Labelled
    products: int
    text_encoder: str


def candidates_of(sets_dir: Path, name: str, image_encoder: ImageEncoder, text_encoder: TextEncoder) -> Candidates:
    evalset = load_set(sets_dir / name)
    pairs = pairs_of(evalset)
    with ingested(evalset, image_encoder, text_encoder) as (engine, _):
        data = labelled_candidates(engine, name, pairs, names=TRANSFER_FEATURES)
        return Candidates(name, data, len(pairs), engine.fingerprint.text)


def pooled(parts: list[Candidates]) -> Labelled:
    """Several sets' candidates as one, their products kept apart (groups offset)."""
    out = Labelled([], [], [], 0)
    offset = 0
    for part in parts:
        out.rows += part.data.rows
        out.labels += part.data.labels
        out.groups += [g + offset for g in part.data.groups]
        out.shops += part.data.shop_of()
        out.positives += part.data.positives
        offset += max(part.data.groups, default=-1) + 1
    return out


def any_shop(data: Labelled) -> Labelled:
    """`data` with every candidate in a shop of its own: decided as if a shop could list a product twice."""
    return Labelled(data.rows, data.labels, data.groups, data.positives, [str(i) for i in range(len(data.rows))])


HEADER = (
    "| fitted on -> judged on | products | target precision | match precision | match recall (of all true pairs) "
    "| decided match | R@1 search | R@1 re-ranked |\n| --- | --- | --- | --- | --- | --- | --- | --- |"
)


def row(fitted_on: str, judged: Candidates, target: float, fit_data: Labelled) -> str:
    calibration = fit_model(fit_data, target_precision=target, names=TRANSFER_FEATURES).calibration
    m = measure(calibration, judged.data, judged.products)
    shown = f"{m['precision']:.3f} | {m['recall']:.3f}" if calibration.reliable else "- | - (unreliable)"
    return (
        f"| {fitted_on} -> {judged.name} | {judged.products} | {target:.2f} | {shown} | {m['decided']} "
        f"| {m['r1_search']:.3f} | {m['r1_model']:.3f} |"
    )


def run(
    sets_dir: Path,
    image_encoder: ImageEncoder,
    text_encoder: TextEncoder,
    *,
    targets: tuple[float, ...],
    ship: float | None,
    out: Path,
) -> str:
    """The cross-dataset table for each target precision; with `ship`, the model fitted on every train split at
    that target written as the default model. Returns the table."""
    train = {name: candidates_of(sets_dir, name, image_encoder, text_encoder) for name in TRAIN_SETS}
    judge = {name: candidates_of(sets_dir, name, image_encoder, text_encoder) for name in JUDGE_SETS}
    lines = [HEADER]
    for target in targets:
        for fit_name, judged_name in (("abt-buy-train", "amazon-google"), ("amazon-google-train", "abt-buy")):
            lines.append(row(fit_name, judge[judged_name], target, train[fit_name].data))
            print(lines[-1], flush=True)
        others = [c for n, c in train.items() if not n.startswith("amazon-google")]
        lines.append(row("abt-buy, beer, itunes-amazon train", judge["amazon-google"], target, pooled(others)))
        print(lines[-1], flush=True)
        others = [c for n, c in train.items() if not n.startswith("abt-buy")]
        lines.append(row("amazon-google, beer, itunes-amazon train", judge["abt-buy"], target, pooled(others)))
        print(lines[-1], flush=True)
    if ship is not None:
        everything = pooled(list(train.values()))
        fitted = fit_model(everything, target_precision=ship, names=TRANSFER_FEATURES, source="default")
        encoders = {c.text_encoder for c in train.values()}
        digest = write_default_model(fitted.calibration, encoders.pop(), list(TRAIN_SETS))
        lines.append(
            f"\nshipped: fitted on {', '.join(TRAIN_SETS)} ({len(everything.labels)} candidates) at target precision "
            f"{ship:.2f}: match at p >= {fitted.calibration.match_threshold:.3f} (out-of-fold precision "
            f"{fitted.calibration.precision:.3f}, recall {fitted.calibration.recall:.3f}); {DEFAULT_MODEL_FILE.name} "
            f"sha256 {digest[:16]}"
        )
        print(lines[-1], flush=True)
        valid = [candidates_of(sets_dir, name, image_encoder, text_encoder) for name in VALID_SETS]
        for judged in [*judge.values(), *valid]:  # in-domain: their train splits were among its data
            m = measure(fitted.calibration, judged.data, judged.products)
            every = measure(fitted.calibration, any_shop(judged.data), judged.products)
            lines.append(
                f"shipped model on {judged.name}: match precision {m['precision']:.3f}, recall {m['recall']:.3f} "
                f"(without one match per shop {every['precision']:.3f} / {every['recall']:.3f}), R@1 "
                f"{m['r1_search']:.3f} -> {m['r1_model']:.3f}"
            )
            print(lines[-1], flush=True)
    table = "\n".join(lines)
    out.mkdir(parents=True, exist_ok=True)
    (out / "transfer.md").write_text(table + "\n", encoding="utf-8")
    return table
