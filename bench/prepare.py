"""Convert ../shared/data into the catalogue contract: the bundled sample and the evaluation sets."""

from __future__ import annotations

import csv
import re
import shutil
from collections.abc import Iterable
from pathlib import Path

from bench.evalset import EvalQuery, write_queries
from schemas.search import ProductRef

GROCERY_RETAILER = "hemkop"
# The sample's second shop: the same 81 products as a shop that photographs its own shelves (the first in-store
# photo of each product in the dataset's train split) and titles them kind first ("Apple: Granny Smith").
SHELF_RETAILER = "corner-store"
# A few in-store phone photos (val split) shipped with the sample to try photo search.
SAMPLE_QUERIES = (
    "Arla-Standard-Milk",
    "Oatly-Natural-Oatghurt",
    "Granny-Smith",
    "Vine-Tomato",
    "Tropicana-Apple-Juice",
)


def _information(folder: Path, name: str) -> dict[str, str]:
    """Fields of `<name>_Information.txt` (Title, Manufacturer and volume, URL ...)."""
    path = folder / f"{name}_Information.txt"
    fields: dict[str, str] = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            key, sep, value = line.partition(":")
            if sep and not line.startswith(" ") and key.strip() not in fields:
                fields[key.strip()] = value.strip()
    return fields


def grocery_products(dataset: Path) -> list[dict[str, str]]:
    """One catalogue row per fine-grained class: its web image, description, category, brand, url."""
    rows = []
    dataset = dataset.resolve()
    with (dataset / "classes.csv").open(encoding="utf-8") as f:
        for item in csv.DictReader(f):
            name = item["Class Name (str)"]
            image = Path(item["Iconic Image Path (str)"].lstrip("/"))
            folder = dataset / image.parent
            top = image.parts[1]  # Fruit | Vegetables | Packages
            info = _information(folder, name)
            brand, volume = "", ""
            if maker := info.get("Manufacturer and volume"):
                brand, _, volume = (s.strip() for s in maker.partition(","))
                brand = re.sub(r"\s+(KO|EKO)$", "", brand).title()
            description = (folder / f"{name}_Description.txt").read_text(encoding="utf-8").strip()
            rows.append(
                {
                    "id": item["Class ID (int)"],
                    "retailer": GROCERY_RETAILER,
                    "title": name.replace("-", " "),
                    "description": " ".join(description.split()),
                    "brand": brand,
                    "category": f"{top} > {item['Coarse Class Name (str)']}",
                    "url": info.get("URL", ""),
                    "image": f"images/{image.name}",
                    "volume": volume,
                    "class_name": name,
                    "source_image": str(dataset / image),
                }
            )
    return rows


GROCERY_COLUMNS = ["id", "retailer", "title", "brand", "category", "url", "image", "volume", "description"]


def write_catalogue(path: Path, rows: Iterable[dict[str, str]], columns: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as out:
        writer = csv.DictWriter(out, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def write_grocery_sample(dataset: Path, dest: Path) -> int:
    """Write catalogue.csv + images/ + queries/ under `dest`; returns the number of products."""
    rows = grocery_products(dataset)
    (dest / "images").mkdir(parents=True, exist_ok=True)
    (dest / "queries").mkdir(parents=True, exist_ok=True)
    for row in rows:
        shutil.copyfile(row["source_image"], dest / row["image"])
    write_catalogue(dest / "catalogue.csv", rows, GROCERY_COLUMNS)
    for line in (dataset / "val.txt").read_text(encoding="utf-8").splitlines():
        photo = Path(line.split(",")[0].strip())
        for name in SAMPLE_QUERIES:
            if photo.name == f"{name}_001.jpg":
                shutil.copyfile(dataset / photo, dest / "queries" / photo.name)
    shutil.copyfile(dataset.parent / "LICENSE", dest / "LICENSE")
    write_catalogue(dest / f"{SHELF_RETAILER}.csv", shelf_products(dataset, rows, dest), GROCERY_COLUMNS)
    return len(rows)


def shelf_products(dataset: Path, rows: list[dict[str, str]], dest: Path) -> list[dict[str, str]]:
    """The second shop's listing of each product: its first train-split in-store photo (copied under
    `dest/images/<shop>/`), a kind-first title, no description, the product's category, brand and volume."""
    first: dict[str, Path] = {}
    for line in (dataset / "train.txt").read_text(encoding="utf-8").splitlines():
        path, class_id, *_ = (part.strip() for part in line.split(","))
        first.setdefault(class_id, Path(path))
    (dest / "images" / SHELF_RETAILER).mkdir(parents=True, exist_ok=True)
    shelf = []
    for row in rows:
        photo = first[row["id"]]
        image = f"images/{SHELF_RETAILER}/{photo.name}"
        shutil.copyfile(dataset / photo, dest / image)
        kind = row["category"].split(" > ")[-1].replace("-", " ")
        shelf.append(
            {
                **{key: row[key] for key in ("brand", "category", "volume")},
                "id": f"c-{row['id']}",
                "retailer": SHELF_RETAILER,
                "title": f"{kind}: {row['title']}",
                "image": image,
            }
        )
    return shelf


def write_grocery_set(dataset: Path, dest: Path, split: str, *, text: str = "kind") -> int:
    """In-store photos of `split` (train | val) -> the shop's product, with a query text.

    text="kind": the coarse class ("apple", "oat milk"), what a shopper knows without reading the pack;
    it narrows the search to a kind of product and the photo has to tell which one.
    text="name": the product's short name ("Arla Standard Milk"), as read off the pack.
    """
    rows = grocery_products(dataset)
    write_catalogue(dest / "catalogue.csv", ({**r, "image": r["source_image"]} for r in rows), GROCERY_COLUMNS)
    by_class = {r["class_name"]: r for r in rows}
    queries = []
    for line in (dataset / f"{split}.txt").read_text(encoding="utf-8").splitlines():
        photo = Path(line.split(",")[0].strip())
        row = by_class[photo.parent.name]
        top, coarse = row["category"].split(" > ")
        queries.append(
            EvalQuery(
                image=str((dataset / photo).resolve()),
                text=coarse.replace("-", " ").lower() if text == "kind" else row["title"],
                expect=[row["id"]],
                category=row["category"],
                group="packaged" if top == "Packages" else "fruit+veg",
            )
        )
    write_queries(dest, queries)
    return len(queries)


_FIELD = re.compile(r"COL (\w+) VAL ")


def parse_ditto_record(text: str) -> dict[str, str]:
    """`COL name VAL x COL price VAL y` -> {"name": "x", "price": "y"}."""
    parts = _FIELD.split(f" {text} ")
    return {parts[i]: parts[i + 1].strip() for i in range(1, len(parts) - 1, 2)}


SPLITS = ("train", "valid", "test")
# What each Magellan set calls a listing's title and maker; its other fields become the description.
TITLE_FIELDS = ("name", "title", "Beer_Name", "Song_Name")
BRAND_FIELDS = ("manufacturer", "Brew_Factory_Name", "Artist_Name")


def _listing(fields: dict[str, str]) -> dict[str, str]:
    """A Ditto record as the catalogue contract's title, brand, description and price."""
    title = next((fields[k] for k in TITLE_FIELDS if fields.get(k)), "")
    brand = next((fields[k] for k in BRAND_FIELDS if fields.get(k)), "")
    price = (fields.get("price") or fields.get("Price") or "").replace("$", "").strip()
    described = {"description", "price", "Price", *TITLE_FIELDS, *BRAND_FIELDS}
    rest = " ".join(v for k, v in fields.items() if k not in described and v)
    return {
        "title": title,
        "brand": brand,
        "description": fields.get("description") or rest,
        "price": price if re.fullmatch(r"\d+(\.\d+)?", price) else "",
    }


def labelled_pairs(folder: Path, split: str) -> list[tuple[str, str, bool]]:
    """(left record text, right record text, same product) of one split file."""
    out = []
    for line in (folder / f"{split}.txt").read_text(encoding="utf-8").splitlines():
        a, b, label = line.split("\t")
        out.append((a, b, label.strip() == "1"))
    return out


def write_text_pairs_set(folder: Path, dest: Path, *, left: str, right: str, split: str = "test") -> int:
    """Labelled pairs of two retailers -> both retailers' records of `split` as one catalogue; each left
    record with a match in `split` is a text query whose answers are its matching right records (left
    retailer excluded).

    The splits share records, and a pair of two records of this split is sometimes labelled in another
    split only: a query's answers are its pairs labelled "same" in any split, except pairs that some split
    also labels "different". The valid split leaves out queries that are test queries too, so that a model
    fitted on valid is measured on test queries it has not seen."""
    ids: dict[tuple[str, str], str] = {}
    records: dict[str, dict[str, str]] = {}

    def record_id(retailer: str, text: str) -> str:
        key = (retailer, text)
        if key not in ids:
            ids[key] = f"{retailer[0]}{len(ids)}"
            records[ids[key]] = {"id": ids[key], "retailer": retailer, **_listing(parse_ditto_record(text))}
        return ids[key]

    pairs = labelled_pairs(folder, split)
    for a, b, _ in pairs:
        record_id(left, a), record_id(right, b)
    every = [pair for other in SPLITS for pair in labelled_pairs(folder, other)]
    different = {(a, b) for a, b, same in every if not same}
    held_out = {a for a, _, same in labelled_pairs(folder, "test") if same} if split != "test" else set()
    queried = {a for a, _, same in pairs if same and a not in held_out}
    matches: dict[str, set[str]] = {}
    for a, b, same in every:
        if same and a in queried and (right, b) in ids and ((a, b) not in different or (a, b, True) in pairs):
            matches.setdefault(ids[(left, a)], set()).add(ids[(right, b)])
    rows = [r for r in records.values() if r["title"]]
    write_catalogue(dest / "catalogue.csv", rows, ["id", "retailer", "title", "brand", "price", "description"])
    queries = []
    for left_id, expected in sorted(matches.items()):
        record = records[left_id]
        text = ". ".join(p for p in (record["title"], record["brand"], record["description"]) if p)
        queries.append(
            EvalQuery(
                text=text,
                expect=sorted(expected),
                exclude_retailer=left,
                product=ProductRef(retailer=left, id=left_id),
            )
        )
    write_queries(dest, queries)
    return len(queries)


def write_alibaba_set(folder: Path, dest: Path) -> int:
    """eSSPR same-item pairs: seller A's photo + title -> the same item from seller B."""
    pairs_file = folder / "same_trigger_recall_pairs_information"
    with pairs_file.open(encoding="utf-8") as f:
        pairs = [{k.strip(): v.strip() for k, v in row.items()} for row in csv.DictReader(f)]
    rows, queries = [], []
    for pair in pairs:
        for side, retailer in (("trigger", "seller-a"), ("recall", "seller-b")):
            rows.append(
                {
                    "id": pair[f"{side}_id"],
                    "retailer": retailer,
                    "title": pair[f"{side}_title"],
                    "image": str((folder / pair[f"{side}_image_name"]).resolve()),
                }
            )
        queries.append(
            EvalQuery(
                image=str((folder / pair["trigger_image_name"]).resolve()),
                text=pair["trigger_title"],
                expect=[pair["recall_id"]],
                exclude_retailer="seller-a",
            )
        )
    write_catalogue(dest / "catalogue.csv", rows, ["id", "retailer", "title", "image"])
    write_queries(dest, queries)
    return len(queries)


def prepare_all(shared: Path, out: Path) -> dict[str, int]:
    """Every evaluation set this project measures, written under `out`; returns queries per set."""
    grocery = shared / "grocery" / "dataset"
    return {
        "grocery-val": write_grocery_set(grocery, out / "grocery-val", "val"),
        "grocery-val-names": write_grocery_set(grocery, out / "grocery-val-names", "val", text="name"),
        "grocery-train": write_grocery_set(grocery, out / "grocery-train", "train"),
        "abt-buy": write_text_pairs_set(shared / "text-pairs" / "abt-buy", out / "abt-buy", left="abt", right="buy"),
        "amazon-google": write_text_pairs_set(
            shared / "text-pairs" / "amazon-google", out / "amazon-google", left="amazon", right="google"
        ),
        "abt-buy-valid": write_text_pairs_set(
            shared / "text-pairs" / "abt-buy", out / "abt-buy-valid", left="abt", right="buy", split="valid"
        ),
        "amazon-google-valid": write_text_pairs_set(
            shared / "text-pairs" / "amazon-google",
            out / "amazon-google-valid",
            left="amazon",
            right="google",
            split="valid",
        ),
        "abt-buy-train": write_text_pairs_set(
            shared / "text-pairs" / "abt-buy", out / "abt-buy-train", left="abt", right="buy", split="train"
        ),
        "amazon-google-train": write_text_pairs_set(
            shared / "text-pairs" / "amazon-google",
            out / "amazon-google-train",
            left="amazon",
            right="google",
            split="train",
        ),
        **{
            f"{name}-{split}": write_text_pairs_set(
                shared / "text-pairs" / name, out / f"{name}-{split}", left=left, right=right, split=split
            )
            for name, left, right in (("beer", "beeradvocate", "ratebeer"), ("itunes-amazon", "itunes", "amazon"))
            for split in ("train", "test")
        },
        "alibaba": write_alibaba_set(shared / "alibaba-pairs" / "eSSPR_same_items_pairs_information", out / "alibaba"),
    }
