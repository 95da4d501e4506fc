"""The catalogue contract: validation of rows, and readers that report bad rows by line number."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from ingest.readers import CatalogueError, validated_records
from schemas.catalogue import CatalogueRecord, category_prefixes
from schemas.report import Rejection


def test_row_maps_contract_columns_and_keeps_the_rest_as_attributes() -> None:
    record = CatalogueRecord.from_row(
        {
            "id": " 42 ",
            "retailer": "shop-a",
            "title": "Oat milk",
            "category": "Packages >  Oat-Milk ",
            "price": "12.50",
            "currency": "sek",
            "image": "a.jpg | b.jpg|",
            "volume": "1l",
            "empty": "",
        },
        line=3,
    )
    assert record.id == "42"
    assert record.category == ["Packages", "Oat-Milk"]
    assert record.category_path == "Packages > Oat-Milk"
    assert category_prefixes(record.category) == ["Packages", "Packages > Oat-Milk"]
    assert record.price == 12.5
    assert record.currency == "SEK"
    assert record.images == ["a.jpg", "b.jpg"]
    assert record.attributes == {"volume": "1l"}


@pytest.mark.parametrize(
    ("row", "field", "message"),
    [
        ({"retailer": "r", "title": "t"}, "id", "Field required"),
        ({"id": "1", "title": "t"}, "retailer", "Field required"),
        ({"id": "1", "retailer": "r"}, None, "at least one of 'image' or 'title'"),
        ({"id": "1", "retailer": "r", "title": "t", "price": "cheap"}, "price", "price must be a number"),
        ({"id": "1", "retailer": "r", "title": "t", "price": "-3"}, "price", "greater than or equal to 0"),
        ({"id": "1", "retailer": "r", "title": "t", "category": "A >> B"}, "category", "empty level"),
        ({"id": "1", "retailer": "r", "title": "x" * 1001}, "title", "at most 1000"),
    ],
)
def test_rows_that_break_the_contract_say_why(row: dict[str, str], field: str | None, message: str) -> None:
    with pytest.raises(ValidationError) as caught:
        CatalogueRecord.from_row(row, line=2)
    error = caught.value.errors()[0]
    assert message in error["msg"]
    if field:
        assert error["loc"][0] == field


def test_jsonl_accepts_image_lists_and_numbers(tmp_path: Path) -> None:
    path = tmp_path / "c.jsonl"
    path.write_text(
        json.dumps({"id": 7, "retailer": "r", "image": ["x.jpg", "y.jpg"], "price": 3, "colour": "red"}) + "\n"
    )
    (record,) = list(validated_records(path))
    assert isinstance(record, CatalogueRecord)
    assert (record.id, record.images, record.price, record.attributes) == (
        "7",
        ["x.jpg", "y.jpg"],
        3.0,
        {"colour": "red"},
    )


def test_csv_rejections_carry_the_line_where_the_row_starts(tmp_path: Path) -> None:
    path = tmp_path / "c.csv"
    path.write_text(
        "id,retailer,title,description,price\n"  # line 1
        '1,r,Good,"a description\nthat spans two lines",1\n'  # lines 2-3
        "2,r,Bad price,,abc\n"  # line 4
        "3,r,Too,many,1,extra\n"  # line 5
        ",r,No id,,\n"  # line 6
        "1,r,Duplicate,,\n"  # line 7
        "4,r,Fine,,2\n",  # line 8
        encoding="utf-8",
    )
    items = list(validated_records(path))
    good = [i for i in items if isinstance(i, CatalogueRecord)]
    bad = {i.line: i for i in items if isinstance(i, Rejection)}
    assert [r.id for r in good] == ["1", "4"]
    assert [r.line for r in good] == [2, 8]
    assert set(bad) == {4, 5, 6, 7}
    assert bad[4].field == "price" and "number" in bad[4].reason
    assert "6 fields but the header has 5" in bad[5].reason
    assert bad[6].field == "id"
    assert "duplicate of line 2" in bad[7].reason


def test_jsonl_rejects_bad_json_and_non_objects(tmp_path: Path) -> None:
    path = tmp_path / "c.jsonl"
    path.write_text('{"id": "1", "retailer": "r", "title": "ok"}\n{not json\n\n[1, 2]\n')
    items = list(validated_records(path))
    assert isinstance(items[0], CatalogueRecord)
    assert [(i.line, i.reason.split(":")[0]) for i in items[1:] if isinstance(i, Rejection)] == [
        (2, "invalid JSON"),
        (4, "expected a JSON object, got list"),
    ]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("c.csv", b"id,retailer\n1,\xff\xfe\n", "not UTF-8"),
        ("c.csv", b"", "is empty"),
        ("c.xml", b"<a/>", "unknown catalogue format"),
        ("missing.csv", None, "does not exist"),
    ],
)
def test_unreadable_catalogue_files_fail_as_a_whole(
    tmp_path: Path, name: str, content: bytes | None, message: str
) -> None:
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(CatalogueError, match=message):
        list(validated_records(path))
