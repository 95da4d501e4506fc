"""Both compose files against the Compose Specification's schema (vendored, see compose_spec/NOTICE.md)
and against the project: no Docker engine runs on the development machines, so this is what checks that
`docker compose up` would read them, that every setting they pass is one the project knows, and that the
cluster's nodes join one cluster."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from retrieval.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = Path(__file__).parent / "compose_spec" / "compose_spec.json"
FILES = ("docker-compose.yml", "docker-compose.cluster.yml")
# Read by the Dockerfile's entry point or by Qdrant itself, not by Settings.
NOT_SETTINGS = {"QDRANT__CLUSTER__ENABLED"}


def _load(name: str) -> dict[str, Any]:
    document = yaml.safe_load((ROOT / name).read_text(encoding="utf-8"))
    assert isinstance(document, dict)
    return document


@pytest.fixture(scope="module")
def validator() -> jsonschema.protocols.Validator:
    schema = json.loads(SCHEMA.read_text(encoding="utf-8"))
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


@pytest.mark.parametrize("name", FILES)
def test_compose_files_follow_the_specification(validator: jsonschema.protocols.Validator, name: str) -> None:
    document = _load(name)
    errors = [f"{'/'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(document)]
    assert errors == []
    services = document["services"]
    for service in services.values():  # every dependency is a service of the file
        assert set(service.get("depends_on") or {}) <= set(services)
    # the schema is strict enough to catch a misspelt key, so a pass above means something
    broken = {**document, "services": {**services, "api": {**services["api"], "port": ["8000:8000"]}}}
    assert any("port" in e.message for e in validator.iter_errors(broken))


@pytest.mark.parametrize("name", FILES)
def test_every_setting_passed_is_one_the_project_reads(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    known = {field.upper() for field in Settings.model_fields}
    for service in _load(name)["services"].values():
        environment = service.get("environment") or {}
        assert set(environment) - NOT_SETTINGS <= known, set(environment) - known
        if "QDRANT_URL" in environment:  # the settings as the service would read them are valid
            for key, value in environment.items():
                monkeypatch.setenv(key, str(value))
            Settings()
            for key in environment:
                monkeypatch.delenv(key)


def test_the_cluster_is_three_nodes_bootstrapped_from_the_first() -> None:
    services = _load("docker-compose.cluster.yml")["services"]
    nodes = sorted(name for name in services if name.startswith("qdrant-"))
    assert nodes == ["qdrant-1", "qdrant-2", "qdrant-3"]
    for node in nodes:
        service = services[node]
        assert service["environment"]["QDRANT__CLUSTER__ENABLED"] == "true"
        command = service["command"]
        assert command[command.index("--uri") + 1] == f"http://{node}:6335"
        assert node == "qdrant-1" or command[command.index("--bootstrap") + 1] == "http://qdrant-1:6335"
    api = services["api"]["environment"]
    assert api["QDRANT_URL"].startswith("http://qdrant-1:")
    assert int(api["QDRANT_WRITE_CONSISTENCY"]) <= int(api["QDRANT_REPLICAS"]) <= len(nodes)


def test_the_cluster_ingest_runs_its_encoders_on_the_ray_workers() -> None:
    services = _load("docker-compose.cluster.yml")["services"]
    ray_services = ("ray-head", "ray-worker", "ingest")
    images = {services[name]["image"] for name in ray_services}
    assert len(images) == 1  # Ray needs the same Ray and Python on the driver and every node
    for name in ray_services:
        assert "ray" in services[name]["build"]["args"]["EXTRAS"].split(",")
    head = services["ray-head"]["command"]
    client_port = next(arg.split("=")[1] for arg in head if arg.startswith("--ray-client-server-port="))
    assert "--head" in head and "--num-cpus=0" in head  # the head schedules, the workers embed
    assert "--address=ray-head:6379" in services["ray-worker"]["command"] and "--port=6379" in head
    ingest = services["ingest"]["command"]
    assert ingest[ingest.index("--ray") + 1] == f"ray://ray-head:{client_port}"
    dockerfile = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    assert 'ARG EXTRAS=""' in dockerfile and 'pip install ".[$EXTRAS]"' in dockerfile
