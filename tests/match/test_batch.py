"""Batch matching: the command line (rows per product, resume after a kill) and the HTTP job."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from ingest.__main__ import main as ingest_main
from retrieval.match.batch import COLUMNS, done_products
from tests.conftest import wait_for_job


def read(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def test_match_a_retailer_then_resume_after_a_cut(cli_shops: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = cli_shops / "matches.csv"
    args = ["match", "--catalogue", "shops", "--retailer", "hemkop", "--out", str(out), "--limit", "2"]
    assert ingest_main([*args, "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "matched 12 products of hemkop" in printed and "decided by the default model" in printed
    rows = read(out)
    assert list(rows[0]) == list(COLUMNS) and len(rows) == 24
    firsts = {r["left_id"]: r for r in rows if r["rank"] == "1"}
    assert all(r["right_id"] == f"o-{left}" and r["right_retailer"] == "other-shop" for left, r in firsts.items())
    # no labels: the default model decides; the other shop's listing of the product is mostly decided a match,
    # the runner-up (a sibling: another apple) never
    assert sum(r["decision"] == "match" for r in firsts.values()) >= 9
    assert {r["decision"] for r in rows if r["rank"] == "2"} <= {"uncertain", "no_match"}
    complete = out.read_text(encoding="utf-8")

    # a run killed in the middle of writing product 8's second row
    lines = complete.splitlines(keepends=True)
    out.write_text("".join(lines[:16]) + lines[16][:20], encoding="utf-8")
    assert ingest_main([*args, "--no-progress"]) == 2  # the file exists: resume or overwrite, never mix
    assert "--resume" in capsys.readouterr().err
    assert done_products(out) == {r["left_id"] for r in rows[:14]}  # product 8's first row went too
    assert ingest_main([*args, "--resume", "--no-progress"]) == 0
    assert "(7 done before, 0 without candidates)" in capsys.readouterr().out
    assert sorted(read(out), key=lambda r: (r["left_id"], r["rank"])) == sorted(
        rows, key=lambda r: (r["left_id"], r["rank"])
    )
    assert ingest_main([*args, "--resume", "--no-progress"]) == 0  # nothing left to do: nothing added
    assert len(read(out)) == 24


def test_match_refuses_what_it_cannot_do(cli_shops: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = cli_shops / "m.csv"
    base = ["match", "--catalogue", "shops", "--out", str(out), "--no-progress"]
    assert ingest_main([*base, "--retailer", "nobody"]) == 2
    assert "no products of retailer 'nobody'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        ingest_main([*base, "--retailer", "hemkop", "--against", "hemkop"])
    out.write_text("something,else\n1,2\n", encoding="utf-8")
    assert ingest_main([*base, "--retailer", "hemkop", "--resume"]) == 2
    assert "not a matches file" in capsys.readouterr().err


SERVICE_SETTINGS = {"max_job_products": 40}  # read by the `client` fixture (conftest)


def test_match_job_over_http(client: TestClient, two_shops: str) -> None:
    submitted = client.post(f"/catalogues/{two_shops}/match-jobs", json={"retailer": "hemkop", "limit": 2})
    assert submitted.status_code == 202, submitted.text
    job = wait_for_job(client, submitted.json()["id"])
    assert (job["status"], job["done"], job["total"], job["error"]) == ("done", 30, 30, None)
    rows = client.get(f"/jobs/{job['id']}/rows", params={"limit": 10_000}).json()
    assert len(rows) == 60 and list(rows[0]) == list(COLUMNS)
    firsts = [r for r in rows if r["rank"] == "1"]
    assert sum(r["right_id"] == f"o-{r['left_id']}" for r in firsts) >= 29  # the twin first, as found by search
    assert client.get(f"/jobs/{job['id']}/rows", params={"offset": 58}).json() == rows[58:]
    text = client.get(f"/jobs/{job['id']}/rows.csv").text
    assert text.splitlines()[0] == ",".join(COLUMNS) and len(text.splitlines()) == 61

    listed = client.post(f"/catalogues/{two_shops}/match-jobs", json={"retailer": "other-shop", "product_ids": ["o-3"]})
    job = wait_for_job(client, listed.json()["id"])
    rows = client.get(f"/jobs/{job['id']}/rows").json()
    assert job["total"] == 1 and [r["right_id"] for r in rows][:1] == ["3"] and len(rows) == 3


@pytest.mark.parametrize(
    ("path", "body", "status", "message"),
    [
        ("/catalogues/two-shops/match-jobs", {"retailer": "nobody"}, 422, "no products of retailer"),
        ("/catalogues/grocery/match-jobs", {"retailer": "hemkop"}, 422, "more than a job takes (40"),
        ("/catalogues/two-shops/match-jobs", {"retailer": "hemkop", "product_ids": ["zzz"]}, 404, "no product"),
        ("/catalogues/nope/match-jobs", {"retailer": "hemkop"}, 404, "nope"),
        ("/catalogues/two-shops/match-jobs", {"retailer": "hemkop", "limit": 0}, 422, "greater than or equal"),
    ],
)
def test_match_job_errors(
    client: TestClient, two_shops: str, path: str, body: dict[str, object], status: int, message: str
) -> None:
    response = client.post(path, json=body)
    assert response.status_code == status and message in response.text, response.text


def test_unknown_job_is_404(client: TestClient) -> None:
    assert client.get(f"/jobs/{'0' * 32}").status_code == 404
    assert client.get("/jobs/not-an-id").status_code == 422
