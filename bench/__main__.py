"""`python -m bench COMMAND`: evaluation sets (prepare), quality tables and plots (quality), backbones, match
calibration (calibrate), the default match model (transfer), the pairwise re-ranker (rerank), adaptation heads
(adapt), the image backbone's fine-tuned tail (finetune-image), the fine-tuned text encoder (finetune-text),
throughput (speed), the cost of hostile inputs (hostile)."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from bench import emit
from bench.prepare import prepare_all, write_grocery_sample

DEFAULT_SHARED = Path("../shared/data")
DEFAULT_SETS = Path("bench/out/sets")
QUALITY_SETS = ["grocery-val", "grocery-val-names", "abt-buy", "amazon-google", "alibaba"]


def ensure_sets(sets_dir: Path, shared: Path, names: list[str]) -> None:
    if any(not (sets_dir / name / "queries.jsonl").is_file() for name in names):
        counts = prepare_all(shared, sets_dir)
        print(f"prepared evaluation sets in {sets_dir}: {counts}")


def quality(args: argparse.Namespace) -> int:
    from bench.evalset import load_set
    from bench.plots import embedding_map, recall_curves, score_distributions
    from bench.quality import evaluate, table, write_results
    from retrieval.encoders import load_image_encoder, load_text_encoder
    from retrieval.settings import Settings

    settings = Settings()
    ensure_sets(args.sets_dir, args.shared, args.sets + ([args.adapt] if args.adapt else []))
    image_encoder = load_image_encoder(args.image_model or settings.image_model, settings.image_precision)
    text_encoder = load_text_encoder(args.text_model or settings.text_model, settings.text_precision)
    print(f"encoders: {image_encoder.name} ({image_encoder.dim}-d), {text_encoder.name} ({text_encoder.dim}-d)")
    runs = {}
    for name in args.sets:
        started = time.perf_counter()
        evalset = load_set(args.sets_dir / name)
        if args.adapt:
            from bench.adapt import evaluate_adapted

            runs[name], runs[f"{name} +head"] = evaluate_adapted(
                evalset,
                image_encoder,
                text_encoder,
                args.sets_dir / args.adapt,
                max_queries=args.max_queries,
                settings=settings,
                fusions=args.fusion,
            )
            run = runs[name]
        else:
            runs[name] = run = evaluate(
                evalset, image_encoder, text_encoder, max_queries=args.max_queries, fusions=args.fusion
            )
        print(
            f"{name}: {run.products} products ingested in {run.ingest_seconds:.1f} s, "
            f"{sum(len(t.outcomes) for t in run.tallies.values())} searches, {time.perf_counter() - started:.1f} s"
        )
        recall_curves(name, run, args.out)
        score_distributions(name, run, args.out)
        embedding_map(name, run, args.out)
    write_results(runs, args.out)
    print(table(runs))
    print(f"table, results.json and plots written to {args.out}")
    return 0


def backbones(args: argparse.Namespace) -> int:
    from bench.backbones import OFFLINE_BACKBONES, compare
    from bench.evalset import load_set
    from retrieval.encoders import load_text_encoder
    from retrieval.settings import Settings

    settings = Settings()
    ensure_sets(args.sets_dir, args.shared, [args.set])
    specs = list(OFFLINE_BACKBONES) + (args.open_clip or [])
    result = compare(
        specs,
        load_set(args.sets_dir / args.set),
        load_text_encoder(settings.text_model, settings.text_precision),
        max_queries=args.max_queries,
    )
    print(result)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "backbones.md").write_text(result + "\n")
    return 0


def transfer(args: argparse.Namespace) -> int:
    from bench.transfer import JUDGE_SETS, TRAIN_SETS, run
    from retrieval.encoders import load_image_encoder, load_text_encoder
    from retrieval.settings import Settings

    settings = Settings()
    ensure_sets(args.sets_dir, args.shared, [*TRAIN_SETS, *JUDGE_SETS])
    image_encoder = load_image_encoder(settings.image_model, settings.image_precision)
    text_encoder = load_text_encoder(settings.text_model, settings.text_precision)
    print(run(args.sets_dir, image_encoder, text_encoder, targets=tuple(args.targets), ship=args.ship, out=args.out))
    return 0


def review(args: argparse.Namespace) -> int:
    from bench.evalset import load_set
    from bench.review import run_strategy, table
    from retrieval.encoders import load_image_encoder, load_text_encoder
    from retrieval.settings import Settings

    settings = Settings()
    judged = args.set if args.judge == "test" else f"{args.set}-valid"
    ensure_sets(args.sets_dir, args.shared, [f"{args.set}-train", judged])
    image_encoder = load_image_encoder(settings.image_model, settings.image_precision)
    text_encoder = load_text_encoder(settings.text_model, settings.text_precision)
    rows = []
    lines = []
    if not args.shipped_default:
        from bench.review import unseen_default

        sets = [f"{name}-train" for name in ("abt-buy", "amazon-google", "beer", "itunes-amazon")]
        ensure_sets(args.sets_dir, args.shared, [s for s in sets if not s.startswith(args.set)])
        path = args.out / f"default-without-{args.set}.json"
        args.out.mkdir(parents=True, exist_ok=True)
        used = unseen_default(args.sets_dir, args.set, image_encoder, text_encoder, path)
        lines.append(f"default model: fitted on {used} ({args.set} unseen)")
        print(lines[-1], flush=True)
    for strategy in args.strategies:
        rows += run_strategy(
            strategy,
            load_set(args.sets_dir / f"{args.set}-train"),
            load_set(args.sets_dir / judged),
            image_encoder,
            text_encoder,
            rounds=args.rounds,
            per_round=args.per_round,
            seed=args.seed,
            coverage_share=args.coverage,
        )
    result = "\n".join([*lines, table(rows)])
    print(result)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"review-{args.set}{'' if args.judge == 'test' else '-valid'}.md").write_text(result + "\n")
    return 0


def calibrate(args: argparse.Namespace) -> int:
    from bench.calibrate import HEADER, calibrate
    from bench.evalset import load_set
    from retrieval.encoders import load_image_encoder, load_text_encoder
    from retrieval.settings import Settings

    settings = Settings()
    names = [name for pair in args.pairs for name in pair.split(":")]
    ensure_sets(args.sets_dir, args.shared, names)
    image_encoder, text_encoder = (
        load_image_encoder(settings.image_model, settings.image_precision),
        load_text_encoder(settings.text_model, settings.text_precision),
    )
    lines = [HEADER]
    for pair in args.pairs:
        fit_name, eval_name = pair.split(":")
        row = calibrate(
            load_set(args.sets_dir / fit_name),
            load_set(args.sets_dir / eval_name),
            image_encoder,
            text_encoder,
            target=args.target_precision,
        )
        lines.append(row)
        print(row, flush=True)
    print("\n".join(lines))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "calibration.md").write_text("\n".join(lines) + "\n")
    return 0


def speed(args: argparse.Namespace) -> int:
    """`speed ingest`, `speed serve`, or both in one run (`speed`, the default: one after the other, each
    table measured side by side, written together to speed.md)."""
    tables = []
    if args.what in ("ingest", "all"):
        from bench.speed import run_ingest
        from retrieval.encoders import load_text_encoder
        from retrieval.settings import Settings

        settings = Settings()
        ingest_table = run_ingest(
            args.shared,
            images=args.images,
            products=args.products,
            rounds=args.rounds,
            text_encoder=load_text_encoder(settings.text_model, settings.text_precision),
            settings=settings,
            ray_workers=args.ray_workers,
        )
        if args.what == "ingest":
            emit(ingest_table, args.out, "speed-ingest.md")
        tables.append("### Ingest\n\n" + ingest_table)
    if args.what in ("serve", "all"):
        from bench.serve_load import run_serve

        serve_table = run_serve(seconds=args.seconds, soak_s=args.soak_s, runtimes=tuple(args.runtime))
        if args.what == "serve":
            emit(serve_table, args.out, "speed-serve.md")
        tables.append("### Serving\n\n" + serve_table)
    if args.what == "all":
        emit("\n\n".join(tables), args.out, "speed.md")
    return 0


def adapt(args: argparse.Namespace) -> int:
    from bench.adapt import run_adapt
    from retrieval.encoders import load_image_encoder, load_text_encoder
    from retrieval.settings import Settings

    settings = Settings()
    ensure_sets(args.sets_dir, args.shared, [args.train, args.set])
    started = time.perf_counter()
    result, quality_tables = run_adapt(
        args.sets_dir,
        load_image_encoder(args.image_model or settings.image_model, settings.image_precision),
        load_text_encoder(settings.text_model, settings.text_precision),
        train=args.train,
        evaluate=args.set,
        seeds=args.seeds,
        settings=settings,
    )
    print(result)
    print(quality_tables)
    print(f"{time.perf_counter() - started:.0f} s")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "adapt.md").write_text(result + "\n\n" + quality_tables + "\n")
    return 0


def rerank(args: argparse.Namespace) -> int:
    import torch

    from bench.rerank import run_rerank
    from retrieval.runtime import load_encoders
    from retrieval.settings import Settings

    if args.threads:
        torch.set_num_threads(args.threads)
    names = args.sets
    ensure_sets(args.sets_dir, args.shared, [f"{n}{part}" for n in names for part in ("", "-valid", "-train")])
    started = time.perf_counter()
    table = run_rerank(
        args.sets_dir,
        args.models or Settings().models_root,
        load_encoders(Settings()),
        names=names,
        epochs=args.epochs,
        cross=not args.no_cross,
    )
    print(f"{time.perf_counter() - started:.0f} s")
    emit(table, args.out, "rerank.md")
    return 0


def finetune_image(args: argparse.Namespace) -> int:
    import torch

    from bench.finetune_image import run_finetune_image
    from retrieval.encoders import load_image_encoder
    from retrieval.encoders.timm_backbone import TimmImageEncoder
    from retrieval.settings import Settings

    torch.set_num_threads(args.threads)
    settings = Settings()
    encoder = load_image_encoder(args.image_model or settings.image_model, settings.image_precision)
    if not isinstance(encoder, TimmImageEncoder):
        print(f"{encoder.name}: fine-tuning a tail needs a timm backbone", file=sys.stderr)
        return 2
    started = time.perf_counter()
    result = run_finetune_image(
        args.shared / "grocery" / "dataset",
        encoder,
        blocks=args.blocks,
        crops=settings.query_crop_shares,
        max_pixels=settings.max_image_pixels,
        lr=args.lr,
        batch_size=args.batch_size,
        epochs=args.epochs,
        patience=args.patience,
        train_views=not args.no_views,
        flip=args.flip,
    )
    print(f"{time.perf_counter() - started:.0f} s")
    emit(result, args.out, "finetune-image.md")
    return 0


def finetune_text(args: argparse.Namespace) -> int:
    import torch

    from bench.finetune_text import run_finetune_text
    from retrieval.adapt.finetune_text import FinetuneOptions
    from retrieval.encoders import load_image_encoder, load_text_encoder
    from retrieval.settings import Settings

    torch.set_num_threads(args.threads)
    logging.getLogger("retrieval.adapt.finetune_text").setLevel(logging.INFO)
    settings = Settings()
    options = FinetuneOptions(
        epochs=args.epochs,
        patience=args.patience,
        lr=args.lr,
        batch_size=args.batch_size,
        max_length=args.max_length,
        max_steps=args.max_steps,
    )
    started = time.perf_counter()
    result = run_finetune_text(
        args.shared,
        load_image_encoder(settings.image_model, settings.image_precision),
        load_text_encoder(settings.text_model, settings.text_precision),
        sets=args.sets,
        train_on=args.train,
        options=options,
        settings=settings,
    )
    print(f"{time.perf_counter() - started:.0f} s")
    emit(result, args.out, "finetune-text.md")
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING)
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--shared", type=Path, default=DEFAULT_SHARED, help="the shared data folder")
    parser.add_argument("--sets-dir", type=Path, default=DEFAULT_SETS, help="where evaluation sets live")
    sub = parser.add_subparsers(dest="command", required=True)

    prepare = sub.add_parser("prepare", help="convert shared data into the catalogue contract")
    prepare.add_argument("what", choices=["sample", "sets"])
    prepare.add_argument("--out", type=Path, help="default: sample/grocery or --sets-dir")

    q = sub.add_parser("quality", help="recall@k / MRR per modality, fused and filtered, with plots")
    q.add_argument("--sets", nargs="+", default=QUALITY_SETS, help=f"set names (default: {' '.join(QUALITY_SETS)})")
    q.add_argument("--max-queries", type=int, help="first N queries of each set (quick runs)")
    q.add_argument("--image-model", help="image encoder spec (default IMAGE_MODEL)")
    q.add_argument("--text-model", help="text encoder spec (default TEXT_MODEL)")
    q.add_argument(
        "--fusion",
        nargs="+",
        default=["rrf"],
        help="fusions for the fused rows: rrf, dbsf, weighted:IMAGE:TEXT[:LEXICAL] (default rrf)",
    )
    q.add_argument(
        "--adapt",
        metavar="TRAIN_SET",
        help="also measure each set with an image head fitted on TRAIN_SET's queries (rows 'NAME +head')",
    )
    q.add_argument("--out", type=Path, default=Path("bench/out/quality"))

    b = sub.add_parser("backbones", help="compare image backbones on one set, image only")
    b.add_argument("--set", default="grocery-val")
    b.add_argument(
        "--open-clip", nargs="*", help="open_clip specs with real weights to add, e.g. open_clip:ViT-B-32/ckpt.pt"
    )
    b.add_argument("--max-queries", type=int)
    b.add_argument("--out", type=Path, default=Path("bench/out"))

    c = sub.add_parser("calibrate", help="fit match thresholds on one set, measure precision/recall on another")
    c.add_argument(
        "--pairs",
        nargs="+",
        default=["abt-buy-valid:abt-buy", "amazon-google-valid:amazon-google"],
        help="FIT_SET:EVAL_SET pairs (default: the valid -> test splits of both text-pair sets)",
    )
    c.add_argument("--target-precision", type=float, default=0.95)
    c.add_argument("--out", type=Path, default=Path("bench/out"))

    a = sub.add_parser("adapt", help="adaptation heads: fit on one set's photos, recall before / after on another")
    a.add_argument("--train", default="grocery-train", help="the set whose queries are the labelled examples")
    a.add_argument("--set", default="grocery-val", help="the set measured (its catalogue is adapted)")
    a.add_argument("--seeds", type=int, default=5, help="seeds of the unsupervised rows")
    a.add_argument("--image-model", help="image encoder spec (default IMAGE_MODEL)")
    a.add_argument("--out", type=Path, default=Path("bench/out"))

    f = sub.add_parser(
        "finetune-image", help="the image backbone's last blocks fine-tuned on grocery train, against the linear head"
    )
    f.add_argument("--blocks", type=int, nargs="+", default=[1, 2, 4], help="tails to train: last N blocks each")
    f.add_argument("--lr", type=float, default=1e-4)
    f.add_argument("--batch-size", type=int, default=256)
    f.add_argument("--epochs", type=int, default=12)
    f.add_argument("--patience", type=int, default=3)
    f.add_argument("--no-views", action="store_true", help="train without the photos' centre crops as views")
    f.add_argument("--flip", action="store_true", help="mirror half of each batch's cached features")
    f.add_argument("--threads", type=int, default=1, help="torch threads (fit seconds are measured on them)")
    f.add_argument("--image-model", help="image encoder spec (default IMAGE_MODEL; a timm backbone)")
    f.add_argument("--out", type=Path, default=Path("bench/out"))

    ft = sub.add_parser(
        "finetune-text", help="the text encoder fine-tuned on text-pair train splits, measured on the test splits"
    )
    ft.add_argument("--sets", nargs="+", default=["abt-buy", "amazon-google"], choices=["abt-buy", "amazon-google"])
    ft.add_argument(
        "--train",
        nargs="+",
        default=["abt-buy", "amazon-google", "both"],
        choices=["abt-buy", "amazon-google", "both"],
        help="models to train: a set's train pairs, or both sets' (each is measured on every --sets)",
    )
    ft.add_argument("--epochs", type=int, default=3)
    ft.add_argument("--patience", type=int, default=1)
    ft.add_argument("--lr", type=float, default=3e-5)
    ft.add_argument("--batch-size", type=int, default=32)
    ft.add_argument("--max-length", type=int, default=64, help="tokens read per text while training and after")
    ft.add_argument("--max-steps", type=int, help="cap on optimiser steps (quick runs)")
    ft.add_argument("--threads", type=int, default=1, help="torch threads (train seconds are measured on them)")
    ft.add_argument("--out", type=Path, default=Path("bench/out"))

    r = sub.add_parser(
        "rerank", help="the cross-encoder learnt from train pairs, in the match model fitted on valid, on test"
    )
    r.add_argument("--sets", nargs="+", default=["abt-buy", "amazon-google"], choices=["abt-buy", "amazon-google"])
    r.add_argument("--epochs", type=int, default=3, help="most epochs (stops when held-out AP stops rising)")
    r.add_argument("--no-cross", action="store_true", help="skip the cross-dataset rows")
    r.add_argument("--models", type=Path, help="where the trained cross-encoders are kept (default MODELS_PATH)")
    r.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    r.add_argument("--out", type=Path, default=Path("bench/out"))

    t = sub.add_parser("transfer", help="the default match model: fit on public pairs, judge cross-dataset, ship")
    t.add_argument("--targets", type=float, nargs="+", default=[0.95, 0.98], help="target precisions to try")
    t.add_argument("--ship", type=float, help="write the model fitted on every train split at this target")
    t.add_argument("--sets-dir", type=Path, default=DEFAULT_SETS)
    t.add_argument("--shared", type=Path, default=DEFAULT_SHARED)
    t.add_argument("--out", type=Path, default=Path("bench/out"))

    rv = sub.add_parser("review", help="the review loop with a simulated reviewer, against as many random pairs")
    rv.add_argument("--set", default="abt-buy", choices=["abt-buy", "amazon-google"])
    rv.add_argument("--rounds", type=int, default=5)
    rv.add_argument("--per-round", type=int, default=40)
    rv.add_argument("--strategies", nargs="+", default=["queue", "random"], choices=["queue", "random"])
    rv.add_argument("--seed", type=int, default=0)
    rv.add_argument(
        "--coverage", type=float, default=0.25, help="the queue's share of random products' best candidates"
    )
    rv.add_argument(
        "--judge",
        choices=["test", "valid"],
        default="test",
        help="the split each round is judged on (valid: to choose)",
    )
    rv.add_argument(
        "--shipped-default",
        action="store_true",
        help="start from the shipped default model (it learnt from the set's own train split); default: one fitted "
        "on the other public sets",
    )
    rv.add_argument("--sets-dir", type=Path, default=DEFAULT_SETS)
    rv.add_argument("--shared", type=Path, default=DEFAULT_SHARED)
    rv.add_argument("--out", type=Path, default=Path("bench/out"))

    h = sub.add_parser("hostile", help="what hostile inputs cost now, against the unbounded way before issue 27")
    h.add_argument("--out", type=Path, default=Path("bench/out"))

    sp = sub.add_parser("speed", help="ingest throughput vs the model alone and a naive loop; re-ingest speed")
    sp.add_argument("what", nargs="?", choices=["ingest", "serve", "all"], default="all")
    sp.add_argument("--ray-workers", type=int, default=2, help="ingest: also on this many Ray actors (0: no Ray row)")
    sp.add_argument("--seconds", type=float, default=20, help="serve: seconds of load per row")
    sp.add_argument("--soak-s", type=float, default=0, help="serve: then a steady-load soak of this many seconds")
    sp.add_argument(
        "--runtime",
        nargs="+",
        default=["auto"],
        choices=["auto", "torch-bf16", "torch-fp32", "onnx-fp32"],
        help="serve: how the image backbone runs, one table each, side by side in one run (default: auto)",
    )
    sp.add_argument("--images", type=int, default=512, help="photos for the throughput rows")
    sp.add_argument("--products", type=int, default=10_000, help="products of the re-ingest catalogue")
    sp.add_argument("--rounds", type=int, default=3, help="ingest: alternating rounds of the throughput rows")
    sp.add_argument("--out", type=Path, default=Path("bench/out"))

    args = parser.parse_args(argv)
    if args.command == "transfer":
        return transfer(args)
    if args.command == "review":
        return review(args)
    if args.command == "hostile":
        from bench.hostile import run as hostile

        return hostile(args.out)
    if args.command == "speed":
        return speed(args)
    if args.command == "calibrate":
        return calibrate(args)
    if args.command == "adapt":
        return adapt(args)
    if args.command == "finetune-image":
        return finetune_image(args)
    if args.command == "rerank":
        return rerank(args)
    if args.command == "finetune-text":
        return finetune_text(args)
    if args.command == "prepare":
        if args.what == "sample":
            out = args.out or Path("sample/grocery")
            print(f"wrote {write_grocery_sample(args.shared / 'grocery' / 'dataset', out)} products to {out}")
        else:
            print(prepare_all(args.shared, args.out or args.sets_dir))
        return 0
    return quality(args) if args.command == "quality" else backbones(args)


if __name__ == "__main__":
    sys.exit(main())
