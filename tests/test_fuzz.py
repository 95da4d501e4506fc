"""The whole OpenAPI surface fuzzed with schemathesis: no generated request gets a 5xx."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings
from schemathesis.checks import not_a_server_error

from retrieval.query import SearchEngine
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
        engine.store.client.delete_collection(name)


@schema.parametrize()
@hypothesis_settings(max_examples=30, deadline=None, database=None, suppress_health_check=list(HealthCheck))
def test_no_server_errors(case: schemathesis.Case[Any], fuzzed_app: FastAPI) -> None:
    case.call_and_validate(checks=[not_a_server_error], app=fuzzed_app)
