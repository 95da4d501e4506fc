"""`python -m ingest adapt --catalogue NAME ...`: fit, store and switch a catalogue's adaptation heads, or
fine-tune its text encoder (`--modality text --method finetune`) or its image backbone's last blocks
(`--modality image --method finetune`) as a new version of the modality."""

from __future__ import annotations

import argparse
import functools
import logging
import sys
from pathlib import Path

from pydantic import ValidationError

from retrieval.adapt.data import PhotoEmbedder, Stored, labelled_examples, read_catalogue, read_examples
from retrieval.adapt.finetune_image import finetune_catalogue_photos
from retrieval.adapt.finetune_text import FinetuneOptions, TextFit, finetune_catalogue
from retrieval.adapt.heads import AdapterError, Adapters, trunk_cache_root
from retrieval.adapt.tail import TailError
from retrieval.adapt.train import Examples, Fit, fit_spread, fit_supervised, held_out_split
from retrieval.encoders import EncoderError, load_image_encoder, load_text_encoder
from retrieval.encoders.timm_backbone import TimmImageEncoder
from retrieval.settings import Settings
from retrieval.store import IMAGE_VECTOR, ProductStore, StoreError
from schemas.adapters import AdapterRecord

log = logging.getLogger("cli.adapt")


def parse_args(argv: list[str], prog: str | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=prog or "python -m ingest adapt",
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
        help="supervised / spread: a head on the frozen vectors; finetune: text, every layer of the text "
        "encoder, trained on the examples' pairs with hard negatives mined from the catalogue; image, the "
        "backbone's last --blocks blocks, trained on the labelled photos (and their centre crops)",
    )
    fitting.add_argument("--blocks", type=int, default=4, help="finetune (image): backbone blocks unfrozen (4)")
    fitting.add_argument("--head", choices=["linear", "mlp"], default="linear")
    fitting.add_argument("--loss", choices=["contrastive", "triplet"], default="contrastive")
    fitting.add_argument(
        "--epochs", type=int, help="most epochs, early stopping ends sooner (heads 60; finetune text 3, image 12)"
    )
    fitting.add_argument(
        "--patience",
        type=int,
        help="held-out measures without a better score before stopping (heads 8; finetune text 1, image 3)",
    )
    fitting.add_argument(
        "--lr", type=float, help="learning rate (supervised 1e-3, spread 1e-4; finetune text 3e-5, image 1e-4)"
    )
    fitting.add_argument("--holdout", type=float, default=1 / 7, help="share of examples held out (0.14)")
    fitting.add_argument(
        "--held-out-by",
        choices=["product", "example"],
        default="product",
        help="heads and image tails: hold out whole products (what the head does for products nobody labelled; "
        "the default) or single examples (new photos of labelled products: choose it when the queries are of "
        "the products you labelled; near-duplicate photos may sit on both sides)",
    )
    fitting.add_argument("--steps", type=int, default=20, help="spread: optimisation steps")
    fitting.add_argument("--batch-size", type=int, help="finetune: pairs (text, 32) or photos (image, 256) per step")
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
    image = args.modality == "image"
    defaults = {"epochs": 60, "patience": 8, "batch_size": 32}
    if finetune:
        defaults = (
            {"epochs": 12, "patience": 3, "batch_size": 256}
            if image
            else {"epochs": 3, "patience": 1, "batch_size": 32}
        )
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    counts = (args.epochs, args.patience, args.steps, args.batch_size, args.max_length, args.max_steps or 1)
    if not 0 < args.holdout < 1 or min(counts) < 1 or (args.eval_every is not None and args.eval_every < 1):
        parser.error(
            "--holdout must be between 0 and 1; --epochs, --patience, --steps, --batch-size, --max-length, "
            "--max-steps and --eval-every at least 1"
        )
    if args.blocks < 1:
        parser.error("--blocks must be at least 1")
    if finetune and (args.examples is None or args.condition != "product"):
        parser.error("--method finetune learns from labelled examples of the same product: give --examples FILE")
    return args


def main(argv: list[str], *, prog: str | None = None) -> int:
    args = parse_args(argv, prog)
    try:
        settings = Settings()
        store = ProductStore.open(settings)
    except (ValidationError, StoreError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    adapters = Adapters(
        store,
        models_root=settings.models_root,
        precision=settings.text_precision,
        image_encoder=functools.cache(lambda: load_image_encoder(settings.image_model, settings.image_precision)),
        cache_root=trunk_cache_root(settings),
        max_pixels=settings.max_image_pixels,
    )
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
        if args.method == "finetune" and args.modality == "image":
            return finetune_image_and_store(args, settings, adapters)
        if args.method == "finetune":
            return finetune_and_store(args, settings, adapters)
        return fit_and_store(args, settings, store, adapters)
    except (AdapterError, EncoderError, StoreError, TailError, ValueError) as exc:
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
        size = f"{r.blocks} blocks" if r.kind == "tail" else f"{r.max_length} tokens"
        model = f"model {r.model[:12]}, {size}" if r.model else ""
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
    record = AdapterRecord.of_fit(
        fit,
        catalogue=catalogue,
        modality="text",
        method="finetune",
        kind="encoder",
        encoder=info.fingerprint.text,
        dim=text_encoder.dim,
        examples=len(tuned.anchors),
        source=str(args.examples),
        model=tuned.digest,
        max_length=args.max_length,
        hard_negatives=fit.hard_negatives,
    )
    saved = adapters.save(record)
    print(describe_finetune(saved, fit))
    return switch_if_better(
        adapters,
        args,
        saved,
        better=fit.after > fit.before,
        short="it does not beat what is active on the held-out anchors",
        done="text queries are embedded by it; {} points re-embedded",
    )


def finetune_image_and_store(args: argparse.Namespace, settings: Settings, adapters: Adapters) -> int:
    """Fine-tune the last blocks of the catalogue's image backbone on the labelled photos, keep the tail by
    digest, store it as the next image version, and switch to it when it beats both the backbone as it is
    and the active image version on the held-out photos (or with --force)."""
    catalogue = args.catalogue
    info = adapters.require_slots(catalogue)
    lines, skipped = read_examples(args.examples)
    encoder = load_image_encoder(settings.image_model, settings.image_precision)
    _check_encoder(encoder.name, info.fingerprint.image, "IMAGE_MODEL")
    if not isinstance(encoder, TimmImageEncoder):
        raise EncoderError(f"fine-tuning the image backbone needs a timm backbone; IMAGE_MODEL is {encoder.name}")

    def on_epoch(epoch: int, held: float, _: object) -> None:
        log.info("image tail: epoch %d, held-out recall@1 %.3f", epoch, held)

    tuned = finetune_catalogue_photos(
        adapters.store,
        catalogue,
        lines,
        encoder,
        base=args.examples.parent,
        models_root=settings.models_root,
        cache_root=trunk_cache_root(settings),
        max_pixels=settings.max_image_pixels,
        blocks=args.blocks,
        epochs=args.epochs,
        patience=args.patience,
        lr=args.lr or 1e-4,
        batch_size=args.batch_size,
        holdout=args.holdout,
        held_out_by=args.held_out_by,
        seed=args.seed,
        on_epoch=on_epoch,
    )
    _report_skipped(skipped + tuned.skipped)
    fit = tuned.fit
    record = AdapterRecord.of_fit(
        fit,
        catalogue=catalogue,
        modality="image",
        method="finetune",
        kind="tail",
        encoder=info.fingerprint.image,
        dim=fit.tail.dim,
        examples=tuned.examples,
        source=str(args.examples),
        model=tuned.digest,
        blocks=args.blocks,
    )
    current = _active_record(adapters, catalogue, "image")
    to_beat = max(fit.before, current.holdout.after if current and current.holdout else fit.before)
    saved = adapters.save(record)
    print(
        f"catalogue {catalogue}: image tail v{saved.version} (the last {args.blocks} blocks of {record.encoder} "
        f"fine-tuned)\n"
        f"  held-out recall@1 {fit.before:.3f} -> {fit.after:.3f} on {fit.holdout} photos (held out by "
        f"{args.held_out_by})"
        + (f" (active {current.label}: {to_beat:.3f})" if current else "")
        + f"\n  {tuned.examples} labelled photos against {tuned.photos} catalogue photos; {fit.epochs} epochs "
        f"(kept {fit.best}), {fit.seconds:.1f} s; {tuned.computed} photo views through the trunk, the rest cached\n"
        f"  model {tuned.digest} in {settings.models_root}"
    )
    return switch_if_better(
        adapters,
        args,
        saved,
        better=fit.after > to_beat,
        short="it does not beat what is active on the held-out photos",
        done="query photos are embedded by it; {} points re-embedded",
    )


def switch_if_better(
    adapters: Adapters, args: argparse.Namespace, saved: AdapterRecord, *, better: bool, short: str, done: str
) -> int:
    """Switch to the version just stored when it is `better` (or with --force), unless --no-activate; say
    which, and how to switch by hand. `short`: why it falls short; `done`: the switch ({} the points)."""
    if args.no_activate or not (better or args.force):
        why = "--no-activate" if args.no_activate else short
        print(
            f"  not switched to ({why}); switch with: python -m ingest adapt --catalogue {saved.catalogue} "
            f"--modality {saved.modality} --use {saved.version}"
        )
        return 0
    rewritten = adapters.activate(saved.catalogue, saved.modality, saved.version, progress=_progress)
    print(f"  active: {done.format(rewritten)} (undo: --rollback)")
    return 0


def _active_record(adapters: Adapters, catalogue: str, modality: str) -> AdapterRecord | None:
    version = adapters.store.info(catalogue).adapters.get(modality)
    return next((r for r in adapters.records(catalogue) if (r.modality, r.version) == (modality, version)), None)


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
    record = AdapterRecord.of_fit(
        fit,
        catalogue=catalogue,
        modality=modality,
        method=args.method,
        kind=args.head,
        condition=args.condition,
        encoder=encoder_name,
        dim=fit.head.dim,
        examples=len(examples),
        source=str(args.examples) if args.examples else f"payload {args.condition}",
        loss=args.loss if args.method == "supervised" else None,
        spread=fit.spread,
    )
    saved = adapters.save(record, fit.head)
    print(describe(saved, fit, args.held_out_by))
    if args.plot:
        from cli.adapt_plot import plot_adaptation

        title = f"{catalogue}: {modality} head v{saved.version} ({args.method}, condition {args.condition})"
        plot_adaptation(examples, fit.head, args.plot, title=title, names=_label_names(stored, examples))
        print(f"  map of the vectors before and after: {args.plot}")
    checked = bool(fit.holdout) or args.method == "supervised"
    return switch_if_better(
        adapters,
        args,
        saved,
        better=checked and fit.after > fit.before,
        # label-free spreading lowers its own objective; whether search gets better, nothing here has judged
        short="it does not beat no head on the held-out examples"
        if checked
        else "no labelled examples judged it: give --examples, or switch with --force",
        done="queries go through it; {} points rewritten",
    )


def _check_encoder(loaded: str, built_with: str, variable: str) -> None:
    if loaded != built_with:
        raise EncoderError(f"the catalogue was built with {built_with}, this process loaded {loaded}: set {variable}")


def run_fit(args: argparse.Namespace, stored: Stored, examples: Examples) -> Fit:
    if args.method == "spread":
        check = None
        if len(examples):  # labelled examples: a small check picks the step (the identity included)
            _, held = held_out_split(examples, args.holdout, args.seed, args.held_out_by)
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
        held_out_by=args.held_out_by,
        seed=args.seed,
    )


def describe(record: AdapterRecord, fit: Fit, by: str) -> str:
    what = f"{record.method} {record.kind}" + (f" {record.loss}" if record.loss else "")
    line = (
        f"catalogue {record.catalogue}: {record.modality} head v{record.version} ({what}, condition {record.condition})"
    )
    if record.holdout:
        h = record.holdout
        line += f"\n  held-out recall@1 {h.before:.3f} -> {h.after:.3f} on {h.examples} examples (held out by {by})"
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
