"""`python -m ingest adapt --catalogue NAME ...`: fit, store and switch a catalogue's adaptation heads, or
fine-tune its text encoder (`--modality text --method finetune`) as a new version of the same kind."""

from __future__ import annotations

import argparse
import logging
import sys
from datetime import UTC, datetime
from pathlib import Path

from pydantic import ValidationError

from retrieval.adapt.data import PhotoEmbedder, Stored, labelled_examples, read_catalogue, read_examples
from retrieval.adapt.finetune_text import FinetuneOptions, TextFit, finetune_catalogue
from retrieval.adapt.heads import AdapterError, Adapters
from retrieval.adapt.train import Examples, Fit, fit_spread, fit_supervised, split
from retrieval.encoders import EncoderError, load_image_encoder, load_text_encoder
from retrieval.settings import Settings
from retrieval.store import IMAGE_VECTOR, ProductStore, StoreError
from schemas.adapters import AdapterRecord, HoldOut

log = logging.getLogger("cli.adapt")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m ingest adapt",
        description="Learn what 'the same' means for a catalogue: fit a small head on top of the frozen image "
        "(or text) vectors, or fine-tune the text encoder itself (--modality text --method finetune), store it "
        "with the catalogue as a new version, write the adapted vectors and make queries use it. Also lists, "
        "switches and rolls back the stored versions.",
        epilog='EXAMPLES: JSON Lines, one labelled example per line: {"image": "photos/1.jpg", "expect": ["42"]} '
        '(a photo, relative to the file; the evaluation-set format), {"text": "...", "expect": [...]}, or '
        '{"product": {"retailer": "a", "id": "1"}, "expect": ["b-7"]} (a stored product; the calibration '
        "pairs format). expect: ids of the stored products that are the same product.",
    )
    parser.add_argument("--catalogue", required=True)
    parser.add_argument("--modality", choices=["image", "text"], default="image", help="which vectors (image)")
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--list", action="store_true", help="list the stored heads and which are active")
    action.add_argument("--rollback", action="store_true", help="back to the head active before (or to none)")
    action.add_argument("--use", type=int, metavar="VERSION", help="make a stored version the active head")
    action.add_argument("--off", action="store_true", help="no head: queries use the raw vectors")
    fitting = parser.add_argument_group("fitting a new head")
    fitting.add_argument("--examples", type=Path, help="labelled examples (JSON Lines, see below)")
    fitting.add_argument(
        "--condition",
        default="product",
        help="what counts as the same: product (the examples' expected ids), category, or a payload key "
        "such as brand or attributes.colour (then the catalogue's own values are the labels)",
    )
    fitting.add_argument(
        "--method",
        choices=["supervised", "spread", "finetune"],
        default="supervised",
        help="supervised / spread: a head on the frozen vectors; finetune (text): every layer of the text "
        "encoder, trained on the examples' pairs with hard negatives mined from the catalogue",
    )
    fitting.add_argument("--head", choices=["linear", "mlp"], default="linear")
    fitting.add_argument("--loss", choices=["contrastive", "triplet"], default="contrastive")
    fitting.add_argument("--epochs", type=int, help="most epochs, early stopping ends sooner (heads 60, finetune 3)")
    fitting.add_argument(
        "--patience", type=int, help="held-out measures without a better score before stopping (heads 8, finetune 1)"
    )
    fitting.add_argument("--lr", type=float, help="learning rate (supervised 1e-3, spread 1e-4, finetune 3e-5)")
    fitting.add_argument("--holdout", type=float, default=1 / 7, help="share of examples held out (0.14)")
    fitting.add_argument("--steps", type=int, default=20, help="spread: optimisation steps")
    fitting.add_argument("--batch-size", type=int, default=32, help="finetune: pairs per step (32)")
    fitting.add_argument("--max-length", type=int, default=64, help="finetune: tokens read per text (64)")
    fitting.add_argument("--max-steps", type=int, help="finetune: a cap on the optimiser steps")
    fitting.add_argument("--eval-every", type=int, help="finetune: steps between held-out measures (each epoch)")
    fitting.add_argument("--seed", type=int, default=0)
    fitting.add_argument("--plot", type=Path, help="write a 2-D map of the vectors before and after (PNG)")
    fitting.add_argument("--no-activate", action="store_true", help="store the head without switching to it")
    fitting.add_argument(
        "--force",
        action="store_true",
        help="switch to the new version even when it does not beat what is active on the held-out examples",
    )
    args = parser.parse_args(argv)
    finetune = args.method == "finetune"
    args.epochs = args.epochs if args.epochs is not None else (3 if finetune else 60)
    args.patience = args.patience if args.patience is not None else (1 if finetune else 8)
    counts = (args.epochs, args.patience, args.steps, args.batch_size, args.max_length, args.max_steps or 1)
    if not 0 < args.holdout < 1 or min(counts) < 1 or (args.eval_every is not None and args.eval_every < 1):
        parser.error(
            "--holdout must be between 0 and 1; --epochs, --patience, --steps, --batch-size, --max-length, "
            "--max-steps and --eval-every at least 1"
        )
    if finetune and (args.modality != "text" or args.examples is None or args.condition != "product"):
        parser.error("--method finetune trains the text encoder on pairs: give --modality text and --examples FILE")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    try:
        settings = Settings()
        store = ProductStore.open(settings)
    except (ValidationError, StoreError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    adapters = Adapters(store, models_root=settings.models_root, precision=settings.text_precision)
    try:
        if args.list:
            return show(adapters, args.catalogue)
        if args.rollback:
            version = adapters.rollback(args.catalogue, args.modality, progress=_progress)
            print(f"catalogue {args.catalogue}: {args.modality} head now {_named(adapters, args, version)}")
            return 0
        if args.use is not None or args.off:
            rewritten = adapters.activate(args.catalogue, args.modality, args.use, progress=_progress)
            named = _named(adapters, args, args.use)
            print(f"catalogue {args.catalogue}: {args.modality} head now {named} ({rewritten} points)")
            return 0
        if args.method == "finetune":
            return finetune_and_store(args, settings, adapters)
        return fit_and_store(args, settings, store, adapters)
    except (AdapterError, EncoderError, StoreError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        store.close()


def _named(adapters: Adapters, args: argparse.Namespace, version: int | None) -> str:
    """How a switch is reported: `version 2`, or a fine-tuned encoder with its model (`encoder v2 1a2b...`)."""
    if version is None:
        return "none (raw vectors)"
    for record in adapters.records(args.catalogue):
        if (record.modality, record.version) == (args.modality, version) and record.model:
            return record.label
    return f"version {version}"


def _progress(done: int, total: int) -> None:
    if done == total or done % 5_000 < 256:
        log.info("adapted vectors written for %d of %d points", done, total)


def show(adapters: Adapters, catalogue: str) -> int:
    active = adapters.store.info(catalogue).adapters
    records = adapters.records(catalogue)
    if not records:
        print(f"catalogue {catalogue}: no adaptation heads")
    for r in records:
        mark = "*" if active.get(r.modality) == r.version else " "
        held = f"held-out R@1 {r.holdout.before:.3f} -> {r.holdout.after:.3f}" if r.holdout else ""
        spread = f"mean cosine {r.spread[0]:.3f} -> {r.spread[1]:.3f}" if r.spread else ""
        model = f"model {r.model[:12]}, {r.max_length} tokens" if r.model else ""
        print(
            f"{mark} {r.modality} v{r.version}: {r.method} {r.kind}"
            + (f" {r.loss}" if r.method == "supervised" else "")
            + f", condition {r.condition}, {r.examples} examples, {r.seconds:.1f} s, {r.created:%Y-%m-%d %H:%M}"
            + "".join(f"; {part}" for part in (held, spread, model) if part)
        )
    return 0


def finetune_and_store(args: argparse.Namespace, settings: Settings, adapters: Adapters) -> int:
    """Fine-tune the catalogue's text encoder on the examples, keep it by digest, store it as the next text
    version, and switch to it when it beats what is active on the held-out anchors (or with --force)."""
    catalogue = args.catalogue
    info = adapters.require_slots(catalogue)
    lines, skipped = read_examples(args.examples)
    text_encoder = load_text_encoder(settings.text_model, settings.text_precision)
    _check_encoder(text_encoder.name, info.fingerprint.text, "TEXT_MODEL")
    options = FinetuneOptions(
        epochs=args.epochs,
        patience=args.patience,
        lr=args.lr or 3e-5,
        batch_size=args.batch_size,
        max_length=args.max_length,
        holdout=args.holdout,
        seed=args.seed,
        eval_every=args.eval_every,
        max_steps=args.max_steps,
        precision=settings.text_precision,
    )
    tuned = finetune_catalogue(adapters, catalogue, lines, text_encoder, options=options)
    _report_skipped(skipped + tuned.anchors.skipped)
    fit = tuned.fit
    record = AdapterRecord(
        catalogue=catalogue,
        modality="text",
        version=1,
        method="finetune",
        kind="encoder",
        condition="product",
        encoder=info.fingerprint.text,
        dim=text_encoder.dim,
        created=datetime.now(UTC),
        examples=len(tuned.anchors),
        source=str(args.examples),
        epochs=fit.epochs,
        seconds=round(fit.seconds, 2),
        holdout=HoldOut(examples=fit.holdout, before=fit.before, after=fit.after),
        model=tuned.digest,
        max_length=args.max_length,
        hard_negatives=fit.hard_negatives,
    )
    saved = adapters.save(record)
    print(describe_finetune(saved, fit))
    if args.no_activate or not (fit.after > fit.before or args.force):
        why = "--no-activate" if args.no_activate else "it does not beat what is active on the held-out anchors"
        print(
            f"  not switched to ({why}); switch with: "
            f"python -m ingest adapt --catalogue {catalogue} --modality text --use {saved.version}"
        )
        return 0
    rewritten = adapters.activate(catalogue, "text", saved.version, progress=_progress)
    print(f"  active: text queries are embedded by it; {rewritten} points re-embedded (undo: --rollback)")
    return 0


def describe_finetune(record: AdapterRecord, fit: TextFit) -> str:
    return (
        f"catalogue {record.catalogue}: text encoder v{record.version} (fine-tuned {record.encoder}, "
        f"{record.max_length} tokens)\n"
        f"  held-out recall@1 {fit.before:.3f} -> {fit.after:.3f} on {fit.holdout} anchors\n"
        f"  {record.examples} anchors, {fit.pairs} pairs, {fit.hard_negatives} with a hard negative above or near "
        f"their match; {fit.epochs} epochs, {fit.steps} steps (kept step {fit.best_step}), {fit.seconds:.1f} s\n"
        f"  model {record.model} in {fit.folder.parent}"
    )


def _report_skipped(skipped: list[str]) -> None:
    for reason in skipped[:20]:
        print(f"  skipped: {reason}", file=sys.stderr)
    if len(skipped) > 20:
        print(f"  ... {len(skipped) - 20} more skipped", file=sys.stderr)


def fit_and_store(args: argparse.Namespace, settings: Settings, store: ProductStore, adapters: Adapters) -> int:
    catalogue, modality = args.catalogue, args.modality
    info = adapters.require_slots(catalogue)
    image = modality == IMAGE_VECTOR
    encoder_name = info.fingerprint.image if image else info.fingerprint.text
    stored = read_catalogue(store, catalogue, modality, args.condition)
    lines, skipped = read_examples(args.examples) if args.examples else (None, [])
    embed = text_encoder = None
    if lines is not None and image:
        encoder = load_image_encoder(settings.image_model, settings.image_precision)
        _check_encoder(encoder.name, encoder_name, "IMAGE_MODEL")
        embed = PhotoEmbedder(
            encoder,
            settings.store_path.parent / "cache",
            max_pixels=settings.max_image_pixels,
            batch_size=settings.batch_size,
        )
    elif lines is not None:
        text_encoder = load_text_encoder(settings.text_model, settings.text_precision)
        _check_encoder(text_encoder.name, encoder_name, "TEXT_MODEL")
    base = args.examples.parent if args.examples else Path(".")
    labelled = labelled_examples(
        stored,
        modality,
        args.condition,
        lines,
        base=base,
        embed_photos=embed,
        text_encoder=text_encoder,
        required=args.method == "supervised",
    )
    skipped += labelled.skipped
    _report_skipped(skipped)
    examples = labelled.examples
    if embed is not None:
        log.info("%d photos embedded, the rest from the cache %s", embed.embedded, embed.path)
    fit = run_fit(args, stored, examples)
    record = AdapterRecord(
        catalogue=catalogue,
        modality=modality,
        version=1,
        method=args.method,
        kind=args.head,
        condition=args.condition,
        loss=args.loss if args.method == "supervised" else None,
        encoder=encoder_name,
        dim=fit.head.dim,
        created=datetime.now(UTC),
        examples=len(examples),
        source=str(args.examples) if args.examples else f"payload {args.condition}",
        epochs=fit.epochs,
        seconds=round(fit.seconds, 2),
        holdout=HoldOut(examples=fit.holdout, before=fit.before, after=fit.after) if fit.holdout else None,
        spread=fit.spread,
    )
    saved = adapters.save(record, fit.head)
    print(describe(saved, fit))
    if args.plot:
        from cli.adapt_plot import plot_adaptation

        title = f"{catalogue}: {modality} head v{saved.version} ({args.method}, condition {args.condition})"
        plot_adaptation(examples, fit.head, args.plot, title=title, names=_label_names(stored, examples))
        print(f"  map of the vectors before and after: {args.plot}")
    better = fit.after > fit.before if fit.holdout or args.method == "supervised" else True
    if args.no_activate or not (better or args.force):
        why = "--no-activate" if args.no_activate else "it does not beat no head on the held-out examples"
        print(
            f"  not switched to ({why}); switch with: "
            f"python -m ingest adapt --catalogue {catalogue} --use {saved.version}"
        )
        return 0
    rewritten = adapters.activate(catalogue, modality, saved.version, progress=_progress)
    print(f"  active: queries go through it; {rewritten} points rewritten (undo: --rollback)")
    return 0


def _check_encoder(loaded: str, built_with: str, variable: str) -> None:
    if loaded != built_with:
        raise EncoderError(f"the catalogue was built with {built_with}, this process loaded {loaded}: set {variable}")


def run_fit(args: argparse.Namespace, stored: Stored, examples: Examples) -> Fit:
    if args.method == "spread":
        check = None
        if len(examples):  # labelled examples: a small check picks the step (the identity included)
            _, held = split(len(examples), args.holdout, args.seed)
            check = examples.take(held)
        return fit_spread(
            stored.rows, kind=args.head, steps=args.steps, lr=args.lr or 1e-4, seed=args.seed, check=check
        )
    return fit_supervised(
        examples,
        kind=args.head,
        loss=args.loss,
        epochs=args.epochs,
        patience=args.patience,
        lr=args.lr or 1e-3,
        holdout=args.holdout,
        seed=args.seed,
    )


def describe(record: AdapterRecord, fit: Fit) -> str:
    what = f"{record.method} {record.kind}" + (f" {record.loss}" if record.loss else "")
    line = (
        f"catalogue {record.catalogue}: {record.modality} head v{record.version} ({what}, condition {record.condition})"
    )
    if record.holdout:
        h = record.holdout
        line += f"\n  held-out recall@1 {h.before:.3f} -> {h.after:.3f} on {h.examples} examples"
    if record.spread:
        line += f"\n  mean pairwise cosine of the catalogue's vectors {record.spread[0]:.3f} -> {record.spread[1]:.3f}"
    unit = "epochs" if record.method == "supervised" else "steps"
    return line + f"\n  {record.examples} examples, {fit.epochs} {unit} (kept {fit.best}), {fit.seconds:.1f} s"


def _label_names(stored: Stored, examples: Examples) -> dict[int, str]:
    names: dict[int, str] = {}
    for owner, label in zip(examples.gallery_owners, examples.gallery_labels, strict=True):
        value = stored.values[int(owner)]
        names.setdefault(int(label), str(value) if value is not None else stored.titles[int(owner)])
    return names
