"""POST /v1/predict is declared on a FastAPI route, which documents it (OpenAPI), and served by PredictHandler, which
skips FastAPI's per-request machinery (serve/predict.py says why). So a query parameter, header, security scheme or
dependency declared on the route is enforced only if the handler checks it itself. Everything the route declares,
read from FastAPI's own dependency tree, must have a probe below, and each probe shows the handler refusing a
request that breaks it: a declaration added without its check fails here."""

from collections.abc import Callable, Iterator
from pathlib import Path

import annotated_types
import pytest
from fastapi import Depends, FastAPI
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from fastapi.security.base import SecurityBase
from fastapi.testclient import TestClient

from serve.app import create_app
from serve.predict import DirectRoute
from serve.settings import Settings
from tests.serve.test_serve_api import png

API_KEY = "route-test-key"
Declared = tuple[str, str]  # (kind, name)


def declared(dependant: Dependant) -> set[Declared]:
    """Every parameter, security scheme and dependency in a route's dependency tree, sub-dependencies included."""
    found: set[Declared] = set()
    for kind in ("path", "query", "header", "cookie", "body"):
        found |= {(kind, param.alias) for param in getattr(dependant, f"{kind}_params")}
    for sub in dependant.dependencies:
        if isinstance(sub.call, SecurityBase):
            found.add(("security", sub.call.model.name))  # the header APIKeyHeader reads
        else:
            found.add(("dependency", getattr(sub.call, "__name__", repr(sub.call))))
        found |= declared(sub)
    return found


@pytest.fixture(scope="module")
def app_and_route(tiny_model: Path) -> Iterator[tuple[TestClient, APIRoute]]:
    app = create_app(Settings(model_uri=str(tiny_model), api_key=API_KEY))
    (route,) = [r for r in app.router.routes if isinstance(r, APIRoute) and r.path == "/v1/predict"]
    assert isinstance(route, DirectRoute)  # served by the handler, not by the endpoint FastAPI documents
    with TestClient(app) as client:  # runs the lifespan: the model loads
        yield client, route


def predict(client: TestClient, key: str | None = API_KEY, **params: object) -> dict:
    headers = {} if key is None else {"X-API-Key": key}
    response = client.post(
        "/v1/predict", files=[("files", ("a.png", png(), "image/png"))], params=params, headers=headers
    )
    return {"status": response.status_code, **response.json()}


def probe_top_k(client: TestClient, route: APIRoute) -> None:
    """Values outside the bounds the route declares for `top_k` are refused; one inside is obeyed."""
    (param,) = [p for p in route.dependant.query_params if p.alias == "top_k"]
    bounds = {type(item): item for item in param.field_info.metadata}
    low, high = bounds[annotated_types.Ge].ge, bounds[annotated_types.Le].le
    for value in (low - 1, high + 1, "many"):
        refused = predict(client, top_k=value)
        assert (refused["status"], refused["error"]["code"]) == (422, "invalid_request"), value
        assert "top_k" in refused["error"]["message"]
    answered = predict(client, top_k=low + 1)
    assert answered["status"] == 200 and len(answered["predictions"][0]["top_k"]) == low + 1


def probe_api_key(client: TestClient, route: APIRoute) -> None:
    """Without the key, or with a wrong one, a request is refused; with it, answered."""
    assert predict(client, key=None)["error"]["code"] == "missing_api_key"
    wrong = predict(client, key="not-the-key")
    assert (wrong["status"], wrong["error"]["code"]) == (401, "invalid_api_key")
    assert predict(client)["status"] == 200


PROBES: dict[Declared, Callable[[TestClient, APIRoute], None]] = {
    ("query", "top_k"): probe_top_k,
    ("dependency", "require_api_key"): probe_api_key,
    ("security", "X-API-Key"): probe_api_key,
}


def test_every_declaration_of_the_predict_route_has_a_probe(app_and_route: tuple[TestClient, APIRoute]) -> None:
    _, route = app_and_route
    unprobed = declared(route.dependant) - set(PROBES)
    assert not unprobed, f"/v1/predict declares {sorted(unprobed)}: make PredictHandler enforce it, and probe it here"
    assert declared(route.dependant) == set(PROBES)  # a probe for a declaration that is gone goes too


@pytest.mark.parametrize("item", sorted(PROBES), ids=lambda item: ":".join(item))
def test_the_handler_enforces_what_the_route_declares(
    app_and_route: tuple[TestClient, APIRoute], item: Declared
) -> None:
    client, route = app_and_route
    PROBES[item](client, route)


def test_the_walk_sees_a_dependency_added_to_a_route() -> None:
    """The check itself: a query parameter and a dependency added to a route's declaration show up."""

    def needs_tenant(tenant: str) -> None: ...

    app = FastAPI()

    @app.post("/x", dependencies=[Depends(needs_tenant)])
    def endpoint(limit: int = 1) -> None: ...

    (route,) = [r for r in app.router.routes if isinstance(r, APIRoute)]
    assert declared(route.dependant) == {("query", "limit"), ("dependency", "needs_tenant"), ("query", "tenant")}
