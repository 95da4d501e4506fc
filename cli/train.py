"""`python -m ingest train --catalogue NAME [--pairs PAIRS.jsonl] [--labels] [--photos EXAMPLES.jsonl]`: learn
what the labels allow, judge every part on a held-out share of them, and switch on only what beats what is active.

In order, since each part changes what the next one sees: the text encoder fine-tuned on the pairs (its
held-out share never read), a linear image head fitted on labelled photos and then the image backbone's
last blocks fine-tuned on them (each switched on only if it beats what is active: the better of the two
wins), then the match model, fitted without
and with a cross-encoder that reads both listings (each on its own share of the labelled products), judged
against the active model on products none of them learnt from."""

from __future__ import annotations

import argparse
import json
import logging
import sqlite3
import sys
import tempfile
from pathlib import Path

from pydantic import ValidationError

from cli.calibrate import UNRELIABLE, between_0_and_1, curve_table, read_pairs
from retrieval.encoders import EncoderError
from retrieval.match.labels import SOURCE, LabelBook
from retrieval.match.model import (
    DEFAULT_DEPTH,
    DEFAULT_FUSION,
    LabelsError,
    active_model,
    check_labels,
    default_applies,
    unreliable_warning,
)
from retrieval.match.training import Judgement, MatchTraining, split_labels, train_matching
from retrieval.runtime import open_runtime
from retrieval.settings import Settings
from retrieval.store import TEXT_VECTOR, ProductStore, StoreError
from retrieval.weights import ModelFolderError
from schemas.search import LabelledPair

log = logging.getLogger("cli.train")


def parse_args(argv: list[str], prog: str | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=prog or "python -m ingest train",
        description="Train what a catalogue's labels allow (the text encoder, an image head, a cross-encoder and "
        "the match model), report recall@1 and the precision / recall of 'match' decisions on a held-out share "
        "of the labels before and after each part, and switch on only what beats what is active.",
        epilog='PAIRS: JSON Lines, {"product": {"retailer": "a", "id": "1"}, "expect": ["b-7"]} per line (the '
        'calibration format). PHOTOS: JSON Lines, {"image": "photos/1.jpg", "expect": ["42"]} per line (the '
        "evaluation-set format). Exit codes: 0 done; "
        f"{UNRELIABLE} the match model stored decides no 'match' (no threshold reached the target precision); "
        "2 nothing trained (bad input, too few labels, store or encoder error).",
    )
    parser.add_argument("--catalogue", required=True)
    parser.add_argument("--pairs", type=Path, help="labelled pairs of stored products")
    parser.add_argument(
        "--labels",
        action="store_true",
        help="also the labels reviewers gave through the service's review loop (LABELS_PATH; contradicted ones left "
        "out)",
    )
    parser.add_argument("--photos", type=Path, help="labelled photos (an image head and a tail learn from them)")
    parser.add_argument(
        "--image-blocks",
        type=int,
        default=4,
        help="backbone blocks fine-tuned on the photos after the linear head (4; 0: the head only)",
    )
    parser.add_argument(
        "--held-out", type=between_0_and_1, default=0.2, help="share of labelled products judged on (0.2)"
    )
    parser.add_argument("--target-precision", type=between_0_and_1, default=0.95)
    parser.add_argument("--accept-precision", type=between_0_and_1, help="a lower precision to decide 'match' at")
    parser.add_argument("--no-text", action="store_true", help="do not fine-tune the text encoder")
    parser.add_argument("--no-rerank", action="store_true", help="do not train a cross-encoder")
    parser.add_argument("--rerank-epochs", type=int, default=3, help="most epochs of the cross-encoder (3)")
    parser.add_argument("--text-epochs", type=int, default=3, help="most epochs of the text encoder (3)")
    parser.add_argument("--depth", type=int, default=DEFAULT_DEPTH, help="candidates the match model re-ranks")
    parser.add_argument(
        "--photos-held-out-by",
        choices=["product", "example"],
        default="product",
        help="the photos' held-out share (--held-out): whole products (default) or single photos (new photos of "
        "labelled products)",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.pairs is None and args.photos is None and not args.labels:
        parser.error("give --pairs, --labels, --photos, or more than one")
    if args.accept_precision is not None and args.accept_precision >= args.target_precision:
        parser.error("--accept-precision must be below --target-precision")
    if not 1 <= args.depth <= 100 or not 1 <= args.rerank_epochs <= 20 or not 1 <= args.text_epochs <= 20:
        parser.error("--depth must be between 1 and 100, --rerank-epochs and --text-epochs between 1 and 20")
    if not 0 <= args.image_blocks <= 50:
        parser.error("--image-blocks must be between 0 and 50")
    return args


def _write_pairs(pairs: list[LabelledPair], folder: Path) -> Path:
    path = folder / "teaching-pairs.jsonl"
    lines = [
        json.dumps({"product": p.product.model_dump(mode="json"), "expect": p.expected_ids()})
        for p in pairs
        if p.positives  # the encoder learns what is the same; a product with no counterpart teaches it nothing
    ]
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def _adapt(argv: list[str]) -> int:
    from cli.adapt import main as adapt

    print(f"\n$ python -m ingest adapt {' '.join(argv)}", flush=True)
    return adapt(argv)


def judgement_table(rows: list[Judgement], chosen: str) -> str:
    lines = [
        "  | on held-out products | products | R@1 | match precision | match recall | decided | switched on |",
        "  | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for j in rows:
        decided = f"{j.precision:.3f} | {j.recall:.3f} | {j.decided}" if j.reliable else "- | - | 0 (unreliable)"
        lines.append(f"  | {j.label} | {j.products} | {j.r1:.3f} | {decided} | {'yes' if j.label == chosen else ''} |")
    return "\n".join(lines)


def main(argv: list[str], *, prog: str | None = None) -> int:
    args = parse_args(argv, prog)
    try:
        settings = Settings()
        pairs = read_pairs(args.pairs) if args.pairs else []
        if args.labels:
            book = LabelBook(settings.labels_file)
            try:
                reviewed = book.pairs(args.catalogue)
            finally:
                book.close()
            print(f"{len(reviewed)} labelled products from the review loop ({settings.labels_file.name})")
            pairs += reviewed
            if not pairs and args.photos is None:
                raise ValueError(f"catalogue {args.catalogue} has no labels from the review loop yet")
    except (ValidationError, ValueError, OSError, sqlite3.Error) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if pairs:
        try:
            with ProductStore.open(settings) as store:
                text_before = store.info(args.catalogue).adapters.get(TEXT_VECTOR)  # unknown catalogue: said first
                check_labels(store, args.catalogue, pairs)
        except (StoreError, LabelsError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    shares = split_labels(pairs, held_out=args.held_out, seed=args.seed) if pairs else None
    if shares is not None and not args.no_text:
        with tempfile.TemporaryDirectory(prefix="train-") as folder:
            # the teaching share only: the match model is fitted on the others, whose text scores must be what a
            # new product's will be (cross-fitting)
            teaching = _write_pairs(shares.rerank, Path(folder))
            code = _adapt(
                [
                    "--catalogue", args.catalogue, "--modality", "text", "--method", "finetune",
                    "--examples", str(teaching), "--epochs", str(args.text_epochs), "--seed", str(args.seed),
                ]
            )  # fmt: skip
        if code != 0:
            print("  (the text encoder stays as it was)", file=sys.stderr)
    if args.photos is not None:
        photos = [
            "--catalogue", args.catalogue, "--modality", "image", "--examples", str(args.photos),
            "--holdout", str(args.held_out), "--held-out-by", args.photos_held_out_by,
        ]  # fmt: skip
        if _adapt([*photos, "--seed", str(args.seed)]) != 0:
            print("  (the image vectors stay as they were)", file=sys.stderr)
        tail = ["--method", "finetune", "--blocks", str(args.image_blocks), "--seed", str(args.seed)]
        if args.image_blocks and _adapt([*photos, *tail]) != 0:  # switched on only if it beats the head
            print("  (the image backbone stays as it was)", file=sys.stderr)
    if shares is None:
        return 0
    print(
        f"\nmatch model: {len(shares.rerank)} products teach the cross-encoder, {len(shares.fit)} fit the model, "
        f"{len(shares.held)} are held out",
        flush=True,
    )
    try:
        store = ProductStore.open(settings)
    except StoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        runtime = open_runtime(settings, store=store)
        # a text encoder this run fine-tuned on the teaching share and switched on
        text_tuned = bool(pairs) and store.info(args.catalogue).adapters.get(TEXT_VECTOR) not in (None, text_before)
        active = active_model(store, args.catalogue, models_root=settings.models_root).calibration
        result = train_matching(
            runtime.engine,
            args.catalogue,
            shares,
            active=active,
            models_root=settings.models_root,
            target_precision=args.target_precision,
            accept_precision=args.accept_precision,
            rerank=not args.no_rerank,
            epochs=args.rerank_epochs,
            depth=args.depth,
            fusion=DEFAULT_FUSION,
            adapters=store.info(args.catalogue).adapters,
            source=str(args.pairs) if args.pairs else SOURCE,
            tuned_on_teaching=text_tuned,
            prior=default_applies(store, args.catalogue),
            progress=lambda line: print(f"  {line}", flush=True),
        )
        if result.chosen is not None:
            store.save_calibration(args.catalogue, result.chosen)
    except (EncoderError, StoreError, ModelFolderError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        store.close()
    return report(args.catalogue, result)


def report(catalogue: str, result: MatchTraining) -> int:
    for note in result.notes:
        print(f"WARNING: {note}", file=sys.stderr)
    print(judgement_table([result.before, *result.tried], result.chosen_label))
    if result.reported:
        products = result.reported[0].products
        print(f"  reported on {products} other held-out products, read by neither the choice nor the refit:")
        print(judgement_table(result.reported, ""))
    if result.chosen is None:
        print(f"catalogue {catalogue}: nothing beat the active match model on the held-out products; it stays")
        return 0
    warning = unreliable_warning(result.chosen)
    if warning:
        print(f"WARNING: catalogue {catalogue}: {warning}", file=sys.stderr)
        print(f"What it can offer (out-of-fold):\n{curve_table(result.chosen)}", file=sys.stderr)
    print(f"catalogue {catalogue}: {result.chosen_label} stored and active")
    return UNRELIABLE if warning else 0
