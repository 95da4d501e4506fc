"""`POST /search`'s form model on hostile fields: bounded before any model runs."""

from __future__ import annotations

from fastapi.testclient import TestClient


def test_hostile_search_fields_are_refused_with_the_field_named(client: TestClient) -> None:
    long = client.post("/search", data={"text": "x" * 20_000})
    assert long.status_code == 422 and "text" in long.text
    many = client.post("/search", data={"text": "milk", "retailer": [f"r{i}" for i in range(101)]})
    assert many.status_code == 422
    huge = client.post("/search", data={"text": "milk", "limit": str(10**30)})
    assert huge.status_code == 422 and "limit" in huge.text
    nan = client.post("/search", data={"text": "milk", "price_min": "nan"})
    assert nan.status_code == 422
