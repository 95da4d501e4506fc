"""Convert the Grocery Store Dataset (MIT) into the catalogue contract: the bundled sample and eval sets."""

from __future__ import annotations

import csv
import re
import shutil
from pathlib import Path

GROCERY_RETAILER = "hemkop"
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


def write_grocery_sample(dataset: Path, dest: Path) -> int:
    """Write catalogue.csv + images/ + queries/ under `dest`; returns the number of products."""
    rows = grocery_products(dataset)
    (dest / "images").mkdir(parents=True, exist_ok=True)
    (dest / "queries").mkdir(parents=True, exist_ok=True)
    columns = ["id", "retailer", "title", "brand", "category", "url", "image", "volume", "description"]
    with (dest / "catalogue.csv").open("w", newline="", encoding="utf-8") as out:
        writer = csv.DictWriter(out, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            shutil.copyfile(row["source_image"], dest / row["image"])
            writer.writerow(row)
    for line in (dataset / "val.txt").read_text(encoding="utf-8").splitlines():
        photo = Path(line.split(",")[0].strip())
        for name in SAMPLE_QUERIES:
            if photo.name == f"{name}_001.jpg":
                shutil.copyfile(dataset / photo, dest / "queries" / photo.name)
    shutil.copyfile(dataset.parent / "LICENSE", dest / "LICENSE")
    return len(rows)
