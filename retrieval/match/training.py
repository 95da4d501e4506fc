"""Learning "the same product" from labelled pairs: candidates mined from the catalogue's own search, the
cross-encoder trained on them, and the shares of the labels each part learns from or is judged on.

One labelled product must never teach a part and then judge it: the labels are split by product into a
share the cross-encoder learns from, a share the match model is fitted on (its pair scores are then those
of products the cross-encoder never read, as they will be in service), and a held-out share on which the
before / after figures are measured."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from retrieval.match.default import default_model
from retrieval.match.model import (
    DEFAULT_DEPTH,
    DEFAULT_FUSION,
    FOLDS,
    Fitted,
    Labelled,
    LabelsError,
    active_model,
    check_enough,
    check_labels,
    default_applies,
    feature_names,
    find_matches,
    first_of_each_shop,
    fit_model,
    labelled_candidates,
    probabilities,
    reranker_of,
)
from retrieval.match.rerank import (
    HARD_NEGATIVES,
    PairSet,
    RerankFit,
    keep_reranker,
    load_reranker,
    train_cross_encoder,
)
from retrieval.search import SearchEngine, to_product
from retrieval.store import ProductNotFound
from schemas.payload import Product
from schemas.search import Calibration, Fusion, LabelledPair


@dataclass(frozen=True)
class Shares:
    """Labelled products by role: `rerank` teaches the cross-encoder, `fit` the match model, `held` judges."""

    rerank: list[LabelledPair]
    fit: list[LabelledPair]
    held: list[LabelledPair]


def split_labels(
    pairs: Sequence[LabelledPair], *, held_out: float = 0.2, rerank_share: float = 0.5, seed: int = 0
) -> Shares:
    """Split by product (every line of one product goes to one share): `held_out` of them judge, and of the
    rest `rerank_share` teach the cross-encoder and the others fit the match model."""
    keys = sorted({(p.product.retailer, p.product.id) for p in pairs})
    order = np.random.default_rng(seed).permutation(len(keys))
    held_n = max(1, round(held_out * len(keys))) if len(keys) >= 5 else 0
    rerank_n = round(rerank_share * (len(keys) - held_n))
    role = {}
    for rank, index in enumerate(order):
        role[keys[index]] = "held" if rank < held_n else "rerank" if rank < held_n + rerank_n else "fit"
    shares: dict[str, list[LabelledPair]] = {"rerank": [], "fit": [], "held": []}
    for pair in pairs:
        shares[role[(pair.product.retailer, pair.product.id)]].append(pair)
    return Shares(**shares)


def mine_pairs(
    engine: SearchEngine,
    catalogue: str,
    pairs: Iterable[LabelledPair],
    *,
    depth: int = DEFAULT_DEPTH,
    hard_negatives: int = HARD_NEGATIVES,
    fusion: Fusion = DEFAULT_FUSION,
    progress: Callable[[int], None] | None = None,
) -> PairSet:
    """Cross-encoder training pairs: each labelled product with every product labelled the same (found by
    the search or not) and with the `hard_negatives` highest-ranked candidates that are not."""
    out = PairSet()
    for number, pair in enumerate(pairs):
        product, results = find_matches(
            engine, catalogue, pair.product.retailer, pair.product.id, calibration=None, limit=depth, fusion=fusion
        )
        found = {r.id for r in results}
        labels = [pair.label(r.retailer, r.id) for r in results]
        negatives = [r.product for r, same in zip(results, labels, strict=True) if same is False][:hard_negatives]
        positives = [r.product for r, same in zip(results, labels, strict=True) if same]
        positives += _missing(engine, catalogue, product, set(pair.expected_ids()) - found)
        negatives += _missing(engine, catalogue, product, set(pair.rejected_ids()) - found)  # judged by a person
        for candidate in positives:
            out.add(product, candidate, True, number)
        for candidate in negatives:
            out.add(product, candidate, False, number)
        if progress:
            progress(number + 1)
    return out


def _missing(engine: SearchEngine, catalogue: str, query: Product, ids: set[str]) -> list[Product]:
    """Products labelled the same that the search did not bring: looked up in the other retailers."""
    if not ids:
        return []
    found = []
    for retailer in engine.store.facet_counts(catalogue, "retailer"):
        if retailer == query.retailer:
            continue
        for product_id in sorted(ids):
            try:
                found.append(engine.store.product(catalogue, retailer, product_id, known=True))
            except ProductNotFound:
                continue
    return [to_product(record.payload or {}) for record in found]


@dataclass(frozen=True)
class Judgement:
    """How one configuration does on labelled products it never learnt from."""

    label: str
    products: int
    r1: float  # share of products whose first candidate is labelled the same
    precision: float  # of the `match` decisions
    recall: float  # of every labelled true pair, found by the search or not
    decided: int
    uncertain: int
    reliable: bool  # the model decides `match` at all (its fitting reached the target precision)

    def beats(self, other: Judgement) -> bool:
        """Better on held-out products: more products right first, or as many and more true pairs decided
        `match`, without deciding fewer of them."""
        return (self.r1, self.recall) > (other.r1, other.recall) and self.recall >= other.recall - 1e-9


def first_hits(groups: Sequence[int], labels: Sequence[bool], score: np.ndarray) -> int:
    """Products whose best-scored candidate is a true match."""
    group_of, same = np.asarray(groups), np.asarray(labels, dtype=bool)
    hits = 0
    for group in np.unique(group_of):
        members = np.nonzero(group_of == group)[0]
        hits += int(same[members[np.argmax(score[members])]])
    return hits


def judge_candidates(label: str, calibration: Calibration | None, data: Labelled, products: int) -> Judgement:
    """Decisions and order of `calibration` (None: the search order, no decisions) on labelled candidates."""
    y = np.asarray(data.labels, dtype=bool)
    if calibration is None:
        p = np.zeros(len(y))
        order = -np.arange(len(y), dtype=np.float64)  # a product's rows come in rank order
    else:
        p = probabilities(calibration, data.rows) if data.rows else np.zeros(0)
        order = p
    match = np.zeros(len(y), bool)
    if calibration is not None and calibration.reliable:
        match = (p >= calibration.match_threshold) & first_of_each_shop(p, data.groups, data.shop_of())
    uncertain = (p >= calibration.uncertain_threshold) & ~match if calibration else np.zeros(len(y), bool)
    return Judgement(
        label=label,
        products=products,
        r1=first_hits(data.groups, data.labels, order) / max(1, products),
        precision=float((match & y).sum() / max(1, match.sum())),
        recall=float((match & y).sum() / max(1, data.positives)),
        decided=int(match.sum()),
        uncertain=int(uncertain.sum()),
        reliable=bool(calibration and calibration.reliable),
    )


def judge(
    label: str,
    engine: SearchEngine,
    catalogue: str,
    pairs: Sequence[LabelledPair],
    calibration: Calibration | None,
) -> Judgement:
    """`calibration` (with its cross-encoder, if it names one) on labelled products, as `/matches` runs it."""
    reranker = reranker_of(engine, calibration) if calibration else None
    data = labelled_candidates(
        engine,
        catalogue,
        pairs,
        depth=calibration.depth if calibration else DEFAULT_DEPTH,
        fusion=calibration.fusion if calibration else DEFAULT_FUSION,
        reranker=reranker,
        rerank_depth=calibration.rerank_depth if calibration else 0,
        names=calibration.features if calibration else None,  # the default model reads fewer than a fitted one
    )
    return judge_candidates(label, calibration, data, len(pairs))


def teach_cross_encoder(mined: PairSet, models_root: Path, *, epochs: int = 3) -> tuple[RerankFit, str]:
    """Train a cross-encoder on mined pairs, a tenth of their products held out for early stopping, and keep
    it under `models_root`: what it did, and the digest that names it."""
    groups = np.asarray(mined.groups)
    labels = np.asarray(mined.labels, dtype=bool)
    unique = np.unique(groups)
    chosen: list[int] = []
    for group in np.random.default_rng(0).permutation(unique):  # a tenth of the products, with both kinds of pair
        chosen.append(int(group))
        inside = np.isin(groups, chosen)
        if len(chosen) >= max(1, len(unique) // 10) and labels[inside].any() and not labels[inside].all():
            break
    stop = np.isin(groups, chosen)
    with tempfile.TemporaryDirectory(prefix="rerank-") as scratch:
        result = train_cross_encoder(
            mined.take(np.nonzero(~stop)[0].tolist()),
            Path(scratch) / "model",
            held_out=mined.take(np.nonzero(stop)[0].tolist()),
            epochs=epochs,
        )
        return result, keep_reranker(result.folder, models_root)


@dataclass
class MatchTraining:
    """What `train_matching` measured and chose: held-out figures per configuration, the one to store."""

    before: Judgement
    tried: list[Judgement]
    chosen: Calibration | None  # None: nothing beat what is active, which stays
    chosen_label: str  # which of `tried` was chosen ("" when none)
    rerank: RerankFit | None
    seconds: dict[str, float]
    notes: list[str]
    # what is active before and what is stored, on products held out of the choice and of the refit alike
    reported: list[Judgement] = field(default_factory=list)

    @property
    def after(self) -> Judgement:
        """The held-out figures of what is active once the training is stored."""
        return next((j for j in self.tried if j.label == self.chosen_label), self.before)


REPORT_FROM = 40  # held-out products from which a half is kept apart to report on


def report_share(held: Sequence[LabelledPair]) -> tuple[list[LabelledPair], list[LabelledPair]]:
    """(the products the choice is made on, those kept to report on): with REPORT_FROM held-out products or
    more, every other product (by product) is kept apart, untouched by the choice and by the refit; with fewer,
    the figures reported are those the choice was made on."""
    products = sorted({(p.product.retailer, p.product.id) for p in held})
    if len(products) < REPORT_FROM:
        return list(held), []
    kept = set(products[1::2])
    return (
        [p for p in held if (p.product.retailer, p.product.id) not in kept],
        [p for p in held if (p.product.retailer, p.product.id) in kept],
    )


def train_matching(
    engine: SearchEngine,
    catalogue: str,
    shares: Shares,
    *,
    active: Calibration | None,
    models_root: Path,
    target_precision: float = 0.95,
    accept_precision: float | None = None,
    rerank: bool = True,
    epochs: int = 3,
    depth: int = DEFAULT_DEPTH,
    fusion: Fusion = DEFAULT_FUSION,
    adapters: dict[str, int] | None = None,
    source: str = "",
    tuned_on_teaching: bool = False,
    prior: bool = False,
    progress: Callable[[str], None] = lambda _: None,
) -> MatchTraining:
    """Fit the match model on the `fit` share, without and (`rerank`) with a cross-encoder trained on the
    `rerank` share; judge each, and what is `active`, on the `held` share; choose the best that beats it, then
    refit it on every label it may learn from. `tuned_on_teaching`: the catalogue's text vectors come from an
    encoder fine-tuned on the `rerank` share (whose scores the match model must then not be fitted on). `prior`: the
    models read the default model's log-odds (where it applies to the catalogue)."""
    seconds: dict[str, float] = {}
    notes: list[str] = []
    started = time.perf_counter()
    choose, report = report_share(shares.held)
    before = judge("active" if active else "search order", engine, catalogue, choose, active)

    def fitted(data: Labelled, reranker: str | None) -> Fitted:
        return fit_model(
            data,
            target_precision=target_precision,
            accept_precision=accept_precision,
            depth=depth,
            fusion=fusion,
            adapters=adapters or {},
            source=source,
            reranker=reranker,
            names=feature_names(pair=reranker is not None, prior=prior),
        )

    progress(f"held-out share judged as it is: {time.perf_counter() - started:.0f} s")
    tried: list[tuple[Judgement, Calibration]] = []
    started = time.perf_counter()
    plain_names = feature_names(pair=False, prior=prior)
    fit_data = labelled_candidates(engine, catalogue, shares.fit, depth=depth, fusion=fusion, names=plain_names)
    plain = fitted(fit_data, None)
    notes += plain.notes
    seconds["match model"] = time.perf_counter() - started
    tried.append((judge("match model", engine, catalogue, choose, plain.calibration), plain.calibration))
    progress(f"match model fitted on {len(shares.fit)} products: {seconds['match model']:.0f} s")
    fitted_rerank: RerankFit | None = None
    if rerank:
        started = time.perf_counter()
        mined = mine_pairs(engine, catalogue, shares.rerank, depth=depth, fusion=fusion)
        try:
            fitted_rerank, digest = teach_cross_encoder(mined, models_root, epochs=epochs)
        except ValueError as exc:  # too few or one-sided teaching pairs: the match model alone is judged
            notes.append(f"no cross-encoder was trained: {exc}")
    if fitted_rerank is not None:
        seconds["cross-encoder"] = time.perf_counter() - started
        progress(
            f"cross-encoder trained on {fitted_rerank.pairs} pairs of {len(shares.rerank)} products: "
            f"held-out AP {fitted_rerank.before:.3f} -> {fitted_rerank.after:.3f}, {seconds['cross-encoder']:.0f} s"
        )
        started = time.perf_counter()
        reranker = load_reranker(models_root, digest)
        fit_data = labelled_candidates(
            engine, catalogue, shares.fit, depth=depth, fusion=fusion, reranker=reranker,
            names=feature_names(pair=True, prior=prior),
        )  # fmt: skip
        paired = fitted(fit_data, digest)
        seconds["match model + cross-encoder"] = time.perf_counter() - started
        label = "match model + cross-encoder"
        tried.append((judge(label, engine, catalogue, choose, paired.calibration), paired.calibration))
    best_judgement, best = max(tried, key=lambda t: (t[0].r1 + t[0].recall, t[0].recall))
    if active is None:  # against the search order: it may decide, but never rank worse by more than a product
        keep = best_judgement.r1 >= before.r1 - 1 / max(1, before.products)
    else:
        keep = best_judgement.beats(before)
    if not keep:
        return MatchTraining(before, [j for j, _ in tried], None, "", fitted_rerank, seconds, notes)
    # Chosen on the held-out share; now refitted on every label it may learn from, its thresholds taken from
    # the refit's out-of-fold probabilities. When a learnt part's scores are features (the cross-encoder, or a
    # text encoder fine-tuned on the teaching share), only on the products it never read: their scores are what
    # a new product's will be (cross-fitting); otherwise on all of them.
    started = time.perf_counter()
    if best.reranker is None and not tuned_on_teaching:
        everything = [*shares.rerank, *shares.fit, *choose]
        data = labelled_candidates(engine, catalogue, everything, depth=depth, fusion=fusion, names=plain_names)
    else:
        everything = [*shares.fit, *choose]
        kept = load_reranker(models_root, best.reranker) if best.reranker else None
        data = labelled_candidates(
            engine, catalogue, everything, depth=depth, fusion=fusion, reranker=kept,
            names=feature_names(pair=kept is not None, prior=prior),
        )  # fmt: skip
    refit = fitted(data, best.reranker)
    seconds["refit on all labels"] = time.perf_counter() - started
    progress(f"{best_judgement.label} refitted on {len(everything)} products: {seconds['refit on all labels']:.0f} s")
    reported = []
    if report:  # the stored model and what it replaces, on products nothing was chosen or fitted on
        reported = [
            judge(before.label, engine, catalogue, report, active),
            judge(f"{best_judgement.label} (stored)", engine, catalogue, report, refit.calibration),
        ]
    return MatchTraining(
        before, [j for j, _ in tried], refit.calibration, best_judgement.label, fitted_rerank, seconds, notes,
        reported,
    )  # fmt: skip


RERANK_FROM = 400  # labelled products from which a cross-encoder is trained unless told: below, its teaching
# share (half the labels) leaves the match model too few to be fitted on (`python -m bench review`: with 160
# review answers the cross-encoder path stored a model finding 0.552 of abt-buy's test pairs, the match model
# alone 0.781 with 120), and the held-out share too few to choose by
PRECISION_SLACK = 0.05  # a held-out precision this far under the target still "holds" (few decisions: noisy)


def acts_better(new: Judgement, old: Judgement, target: float) -> bool:
    """Whether `new` gives decisions a marketplace can act on better than `old`, both judged on labelled
    products neither learnt from: first whether its `match` decisions hold the target precision (less the
    slack), then how many true pairs they find, then how many products get the right candidate first."""

    def key(j: Judgement) -> tuple[bool, float, float]:
        holds = j.reliable and (j.decided == 0 or j.precision >= target - PRECISION_SLACK)
        return holds, round(j.recall if holds else 0.0, 6), round(j.r1, 6)

    return key(new) > key(old)


def judge_by_folds(
    label: str, data: Labelled, products: int, fit: Callable[[Labelled], Fitted], *, folds: int = FOLDS
) -> Judgement:
    """A way of fitting judged on every labelled product: fitted `folds` times without one fold of products, its
    decisions on that fold pooled. On a few dozen labelled products one held-out share of a fifth is too few to
    choose by (a product more or less moves the figures by points); every product judged once is five times
    as many, and none is judged by a model that learnt from it."""
    x = np.asarray(data.rows, dtype=np.float64)
    y = np.asarray(data.labels, dtype=bool)
    groups = np.asarray(data.groups)
    shops = np.asarray(data.shop_of(), dtype=object)
    p = np.zeros(len(y))
    match = np.zeros(len(y), dtype=bool)
    uncertain = np.zeros(len(y), dtype=bool)
    reliable = True
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=0)
    for inside, outside in splitter.split(x, y, groups):
        inside_rows = (x[inside].tolist(), y[inside].tolist(), groups[inside].tolist())
        part = Labelled(*inside_rows, int(y[inside].sum()), shops[inside].tolist())
        calibration = fit(part).calibration
        p[outside] = probabilities(calibration, x[outside])
        first = first_of_each_shop(p[outside], groups[outside].tolist(), shops[outside].tolist())
        match[outside] = (p[outside] >= calibration.match_threshold) & first & calibration.reliable
        uncertain[outside] = (p[outside] >= calibration.uncertain_threshold) & ~match[outside]
        reliable = reliable and calibration.reliable
    return Judgement(
        label=label,
        products=products,
        r1=first_hits(groups.tolist(), y.tolist(), p) / max(1, products),
        precision=float((match & y).sum() / max(1, match.sum())),
        recall=float((match & y).sum() / max(1, data.positives)),
        decided=int(match.sum()),
        uncertain=int(uncertain.sum()),
        reliable=reliable or bool(match.any()),
    )


def _columns(data: Labelled, names: Sequence[str], wanted: Sequence[str]) -> Labelled:
    """`data` with only the `wanted` features (a subset of its `names`), in that order."""
    at = [list(names).index(name) for name in wanted]
    return Labelled([[row[i] for i in at] for row in data.rows], data.labels, data.groups, data.positives, data.shops)


def train_on_labels(
    engine: SearchEngine,
    catalogue: str,
    pairs: Sequence[LabelledPair],
    *,
    models_root: Path,
    rerank: bool | None = None,
    target_precision: float = 0.95,
    held_out: float = 0.2,
    seed: int = 0,
    source: str = "",
    progress: Callable[[str], None] = lambda _: None,
) -> MatchTraining:
    """The catalogue's match model trained on `pairs` and stored when its decisions act better
    (`acts_better`) than those of what is active, judged on labelled products neither learnt from.

    Below RERANK_FROM labelled products (or `rerank=False`): the match model alone, judged by folds over every
    labelled product (`judge_by_folds`) against the active model's decisions on the same products, then
    refitted on all of them. From there (or `rerank=True`): `train_matching`, which adds a cross-encoder and
    judges on a held-out share. A model an earlier round fitted on these same labels (same `source`) cannot be
    judged on them; the model nothing here learnt from (the default one, else the search order) stands in for
    it, and when the new model does not act better than that, the earlier one is dropped too. LabelsError when
    the labels cannot train anything."""
    check_labels(engine.store, catalogue, pairs)
    products = len({(p.product.retailer, p.product.id) for p in pairs})
    rerank = products >= RERANK_FROM if rerank is None else rerank
    active = active_model(engine.store, catalogue, models_root=models_root)
    baseline = active.calibration
    own_round = active.name == "catalogue" and baseline is not None and bool(source) and baseline.source == source
    prior = default_applies(engine.store, catalogue)
    if own_round:
        shipped = default_model() if prior else None
        baseline = shipped.calibration if shipped else None
    before_label = (
        "default model"
        if baseline is not None and baseline.source == "default"
        else ("active" if baseline is not None else "search order")
    )
    if rerank:
        shares = split_labels(pairs, held_out=held_out, rerank_share=0.5, seed=seed)
        result = train_matching(
            engine, catalogue, shares, active=baseline, models_root=models_root, target_precision=target_precision,
            rerank=True, adapters=engine.store.info(catalogue).adapters, source=source, prior=prior,
            progress=progress,
        )  # fmt: skip
    else:
        started = time.perf_counter()
        names = feature_names(pair=False, prior=prior)
        data = labelled_candidates(engine, catalogue, pairs, depth=DEFAULT_DEPTH, fusion=DEFAULT_FUSION, names=names)
        check_enough(data)
        adapters = engine.store.info(catalogue).adapters

        def fitted(part: Labelled) -> Fitted:
            return fit_model(part, target_precision=target_precision, adapters=adapters, source=source, names=names)

        notes: list[str] = []
        try:
            tried = judge_by_folds("match model", data, products, fitted)
        except LabelsError as exc:  # one fold without enough of both kinds: nothing can be judged yet
            notes.append(f"the match model cannot be judged by folds yet ({exc}); what is active stays")
            tried = Judgement("match model", products, 0.0, 0.0, 0.0, 0, 0, reliable=False)
        if baseline is None:
            before = judge_candidates(before_label, None, data, products)
        elif set(baseline.features) <= set(names):  # the default model, or a model fitted the same way
            before = judge_candidates(before_label, baseline, _columns(data, names, baseline.features), products)
        else:  # a model with a cross-encoder, or fitted without the prior: its own features
            before = judge(before_label, engine, catalogue, pairs, baseline)
        chosen = None
        if acts_better(tried, before, target_precision):
            refit = fitted(data)
            chosen, notes = refit.calibration, refit.notes
        seconds = {"match model, judged by folds and refitted": time.perf_counter() - started}
        progress(f"match model on {products} labelled products: {seconds[next(iter(seconds))]:.0f} s")
        result = MatchTraining(before, [tried], chosen, "match model" if chosen else "", None, seconds, notes)
    if result.chosen is not None:
        engine.store.save_calibration(catalogue, result.chosen)
    elif own_round:  # the earlier round's model was judged by proxy: what did not beat the proxy goes with it
        engine.store.save_calibration(catalogue, None)
    return result
