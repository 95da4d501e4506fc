"""The whole OpenAPI surface fuzzed with schemathesis, then the input classes a schema never generates
(non-finite numbers, integers past 64 bits, lone surrogates, control characters, separators and long levels
in categories) injected anywhere into valid requests: no request gets a 5xx."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error

from retrieval.search import SearchEngine
from retrieval.settings import Settings
from service.app import create_app
from service.state import AppState

# The operations come from the app's OpenAPI document, built without loading anything (no lifespan runs);
# each generated request then goes to the real app of the fixture below, in process.
schema = schemathesis.openapi.from_dict(create_app(Settings()).openapi())


@pytest.fixture(scope="module")
def fuzzed_app(
    engine: SearchEngine, sample_settings: Settings, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[FastAPI]:
    settings = sample_settings.model_copy(
        update={"sources_path": tmp_path_factory.mktemp("fuzz-sources"), "max_ingest_upload_bytes": 256 * 1024}
    )
    state = AppState(settings, engine.store, engine)
    before = set(engine.store.catalogues())
    yield create_app(settings, state=state)
    state.jobs.close(timeout=120)
    for name in set(engine.store.catalogues()) - before:  # catalogues a fuzzed ingest created
        engine.store.drop_catalogue(name)


@schema.parametrize()
@hypothesis_settings(max_examples=30, deadline=None, database=None, suppress_health_check=list(HealthCheck))
def test_no_server_errors(case: schemathesis.Case[Any], fuzzed_app: FastAPI) -> None:
    case.call_and_validate(checks=[not_a_server_error], app=fuzzed_app)


# Raw JSON fragments the schema never produces; each replaces one value (or becomes a new key's value).
HOSTILE_JSON = st.one_of(
    st.sampled_from(
        [
            "NaN",
            "-NaN",
            "Infinity",
            "-Infinity",
            "1e400",
            "-1e400",
            "1e-400",
            "9223372036854775808",
            "-9223372036854775809",
            "1" * 40,
            "18446744073709551616",
            '"\\ud800"',
            '"\\udfff x"',
            '"a\\u0000b"',
            '"\\n\\r\\u001b[2J"',
            '">"',
            '"a > > b"',
            '"Fruit >"',
            '"> Fruit"',
            json.dumps("x" * 300),
            json.dumps("a > " + "y" * 300),
            "[]",
            "{}",
            "null",
            "true",
            "-0",
            "[NaN]",
            '{"\\ud800": 1}',
        ]
    ),  # fmt: skip
    st.text(alphabet=" >|\n\t\\\x00\u00a0\u2028\u202ex1", max_size=40).map(json.dumps),
)
# The same classes as form and query values (a form cannot carry a lone surrogate: UTF-8 has none).
HOSTILE_TEXT = st.one_of(
    st.sampled_from(["nan", "NaN", "inf", "-Infinity", "1e400", "9" * 400, "-0", ">", "a > > b", "Fruit >", "x" * 300]),
    st.text(alphabet=" >|\n\r\t\x00\u00a0\u2028\u202ex1", max_size=40),
)
SEARCH_BODY: dict[str, Any] = {
    "catalogue": "grocery",
    "text": "oat milk",
    "filters": {
        "category": "Packages",
        "retailer": ["hemkop"],
        "price_min": 0,
        "price_max": 100,
        "where": [{"key": "price", "any": [1, 2]}, {"key": "attributes.volume", "match": "1l"}],
    },
    "options": {"fusion": "weighted", "image_weight": 1.0, "text_weight": 0.5, "limit": 5, "score_threshold": 0.0},
}
PRODUCT_BODY: dict[str, Any] = {"catalogue": "grocery", "product": {"retailer": "hemkop", "id": "41"}}
MATCH_JOB_BODY: dict[str, Any] = {"retailer": "hemkop", "against": ["other"], "product_ids": ["41"], "limit": 2}
MARK = "\u0001mark\u0001"


def places(value: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every place a value can go: each existing value, and a new key in each object."""
    found = [path]
    if isinstance(value, dict):
        found.append((*path, "extra"))
        for key, child in value.items():
            found += places(child, (*path, key))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            found += places(child, (*path, index))
    return found


def injected(body: Any, path: tuple[Any, ...], fragment: str) -> bytes:
    """`body` as JSON with the value at `path` replaced by the raw `fragment`."""
    copy = json.loads(json.dumps(body))
    if not path:
        return fragment.encode("utf-8", "surrogatepass")
    parent = copy
    for step in path[:-1]:
        parent = parent[step]
    parent[path[-1]] = MARK
    return json.dumps(copy).replace(json.dumps(MARK), fragment).encode("utf-8", "surrogatepass")


@pytest.fixture(scope="module")
def hostile_client(engine: SearchEngine, sample_settings: Settings) -> Iterator[TestClient]:
    with TestClient(
        create_app(state=AppState(sample_settings, engine.store, engine)), base_url="http://localhost"
    ) as client:
        yield client


def targets() -> st.SearchStrategy[tuple[str, bytes]]:
    bodies = [
        ("/search/json", SEARCH_BODY),
        ("/search/json", PRODUCT_BODY),
        ("/catalogues/grocery/match-jobs", MATCH_JOB_BODY),
    ]
    return st.sampled_from(bodies).flatmap(
        lambda target: st.tuples(st.just(target[0]), st.sampled_from(places(target[1])), HOSTILE_JSON).map(
            lambda chosen: (chosen[0], injected(target[1], chosen[1], chosen[2]))
        )
    )


@given(target=targets())
@hypothesis_settings(max_examples=150, deadline=None, database=None, suppress_health_check=list(HealthCheck))
def test_hostile_json_anywhere_is_never_a_server_error(hostile_client: TestClient, target: tuple[str, bytes]) -> None:
    path, body = target
    response = hostile_client.post(path, content=body, headers={"content-type": "application/json"})
    assert response.status_code < 500, (path, body[:300], response.text[:300])
    if response.status_code == 422:
        json.dumps(response.json(), ensure_ascii=False).encode("utf-8")  # the answer itself is clean UTF-8


FORM_FIELDS = ["text", "category", "price_min", "price_max", "score_threshold", "image_weight", "limit", "retailer"]


@given(field=st.sampled_from(FORM_FIELDS), value=HOSTILE_TEXT, query_value=HOSTILE_TEXT)
@hypothesis_settings(max_examples=80, deadline=None, database=None, suppress_health_check=list(HealthCheck))
def test_hostile_form_and_query_values_are_never_a_server_error(
    hostile_client: TestClient, field: str, value: str, query_value: str
) -> None:
    form = hostile_client.post("/search", data={"text": "oat milk", "catalogue": "grocery", field: value})
    assert form.status_code < 500, (field, value, form.text[:300])
    for name in ("category", "limit", "fusion"):
        matches = hostile_client.get("/catalogues/grocery/products/hemkop/41/matches", params={name: query_value})
        assert matches.status_code < 500, (name, query_value, matches.text[:300])
