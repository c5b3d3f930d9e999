"""The Open Inference Protocol (v2) through a real uvicorn server: NVIDIA's own client (`tritonclient[http]`), JSON
and binary tensors, answers equal to /v1/predict's on the same real images, the /v1 service underneath (A/B
variants, feedback, drift window, metrics, API key), and every malformed request a 4xx with the protocol's body."""

import io
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.http as triton
from PIL import Image
from tritonclient.utils import InferenceServerException

from cifarlab_contract.drift import softmax
from serve.preprocess import decode_batch
from tests.serve.conftest import API_KEY, Server

pytestmark = pytest.mark.slow  # the session's trained model, served by uvicorn

INFER = "/v2/models/cifarlab/infer"


def key() -> dict[str, str]:
    """A fresh header dict per call: tritonclient adds Inference-Header-Content-Length to the dict it is given."""
    return {"X-API-Key": API_KEY}


@pytest.fixture
def triton_client(server: Server) -> Iterator[triton.InferenceServerClient]:
    client = triton.InferenceServerClient(server.url.removeprefix("http://"))
    yield client
    client.close()


@pytest.fixture(scope="module")
def images(test_images: list[tuple[str, str, bytes]]) -> np.ndarray:
    """The sample's real test images as /v1/predict decodes them: uint8 [40, 32, 32, 3]."""
    return decode_batch([jpeg for _, _, jpeg in test_images], 1024 * 1024)


def v1_probabilities(client: httpx.Client, jpegs: list[bytes]) -> np.ndarray:
    files = [("files", (f"{i}.jpg", blob, "image/jpeg")) for i, blob in enumerate(jpegs)]
    response = client.post("/v1/predict", params={"top_k": 10}, files=files)
    assert response.status_code == 200, response.text
    rows = np.zeros((len(jpegs), 10))
    for row, prediction in zip(rows, response.json()["predictions"], strict=True):
        for entry in prediction["top_k"]:
            row[entry["class_index"]] = entry["probability"]
    return rows


def triton_input(batch: np.ndarray, binary: bool) -> triton.InferInput:
    tensor = triton.InferInput("images", list(batch.shape), "UINT8")
    tensor.set_data_from_numpy(batch, binary_data=binary)
    return tensor


def served_version(client: httpx.Client) -> str:
    return client.get("/v1/model").json()["version"]


def test_tritonclient_health_server_and_model_metadata(triton_client, client):
    version = served_version(client)
    assert triton_client.is_server_live() and triton_client.is_server_ready()
    server = triton_client.get_server_metadata()
    assert server["name"] == "cifarlab" and "binary_tensor_data" in server["extensions"]
    assert triton_client.is_model_ready("cifarlab", headers=key())
    assert triton_client.is_model_ready("cifarlab", version, headers=key())
    assert not triton_client.is_model_ready("cifarlab", "not-a-version", headers=key())
    assert not triton_client.is_model_ready("no-such-model", headers=key())
    metadata = triton_client.get_model_metadata("cifarlab", headers=key())
    assert metadata == triton_client.get_model_metadata("cifarlab", version, headers=key())
    assert metadata["name"] == "cifarlab" and metadata["versions"] == [version]
    assert metadata["inputs"] == [{"name": "images", "datatype": "UINT8", "shape": [-1, 32, 32, 3]}]
    assert metadata["outputs"] == [
        {"name": "logits", "datatype": "FP32", "shape": [-1, 10]},
        {"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]},
    ]
    assert len(metadata["parameters"]["classes"]) == 10


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_tritonclient_infer_equals_v1_predict_on_real_images(
    triton_client, client, test_images, images, onnx_model, binary, batch_size
):
    """The same real images through both APIs: the same probabilities, and logits that are the model's own."""
    start = {1: 0, 3: 5, 8: 30}[batch_size]  # different images for each size
    batch = images[start : start + batch_size]
    expected = v1_probabilities(client, [jpeg for _, _, jpeg in test_images[start : start + batch_size]])
    result = triton_client.infer("cifarlab", [triton_input(batch, binary)], headers=key())
    logits, probabilities = result.as_numpy("logits"), result.as_numpy("probabilities")
    assert logits.shape == probabilities.shape == (batch_size, 10) and logits.dtype == np.float32
    np.testing.assert_allclose(probabilities, expected, rtol=1e-5, atol=1e-7)
    assert (probabilities.argmax(axis=1) == expected.argmax(axis=1)).all()
    np.testing.assert_allclose(softmax(logits), probabilities, rtol=1e-5, atol=1e-7)
    session = ort.InferenceSession(str(onnx_model), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(logits, session.run(["logits"], {"images": batch})[0], rtol=1e-4, atol=1e-5)
    answer = result.get_response()
    assert answer["model_name"] == "cifarlab" and answer["model_version"] == served_version(client)
    assert answer["parameters"]["variant"] == "default" and len(answer["parameters"]["request_id"]) == 32


def test_tritonclient_infer_of_a_version_and_of_chosen_outputs(triton_client, client, images):
    """A named version, a request id, and each output in the form it was asked for."""
    version = served_version(client)
    outputs = [
        triton.InferRequestedOutput("probabilities", binary_data=False),
        triton.InferRequestedOutput("logits", binary_data=True),
    ]
    result = triton_client.infer(
        "cifarlab", [triton_input(images[:2], True)], version, outputs=outputs, request_id="r-1", headers=key()
    )
    answer = result.get_response()
    assert answer["id"] == "r-1" and answer["model_version"] == version
    by_name = {output["name"]: output for output in answer["outputs"]}
    assert list(by_name) == ["probabilities", "logits"]
    assert len(by_name["probabilities"]["data"]) == 20 and "parameters" not in by_name["probabilities"]
    assert by_name["logits"]["parameters"] == {"binary_data_size": 2 * 10 * 4} and "data" not in by_name["logits"]
    np.testing.assert_allclose(softmax(result.as_numpy("logits")), result.as_numpy("probabilities"), rtol=1e-5)
    only = triton_client.infer(
        "cifarlab", [triton_input(images[:2], False)], outputs=[triton.InferRequestedOutput("logits")], headers=key()
    )
    assert only.as_numpy("probabilities") is None
    np.testing.assert_array_equal(only.as_numpy("logits"), result.as_numpy("logits"))


def test_tritonclient_sees_the_protocols_errors(triton_client, images):
    with pytest.raises(InferenceServerException) as unknown:
        triton_client.infer("cifarlab", [triton_input(images[:1], True)], "nope", headers=key())
    assert unknown.value.status() == "404" and "no version 'nope'" in unknown.value.message()
    with pytest.raises(InferenceServerException) as no_key:
        triton_client.infer("cifarlab", [triton_input(images[:1], True)])
    assert no_key.value.status() == "401" and "X-API-Key" in no_key.value.message()


def test_nested_and_flat_json_data_give_the_same_answer(client, images):
    batch = images[:2]

    def infer(data: object) -> list[float]:
        tensor = {"name": "images", "shape": [2, 32, 32, 3], "datatype": "UINT8", "data": data}
        response = client.post(INFER, json={"inputs": [tensor]})
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == "application/json"
        (logits, _) = response.json()["outputs"]
        assert logits["name"] == "logits" and logits["shape"] == [2, 10]
        return logits["data"]

    assert infer(batch.tolist()) == infer(batch.ravel().tolist())


def tensor(shape: list[int] | None = None, **fields: object) -> dict:
    shape = shape or [1, 32, 32, 3]
    return {"name": "images", "shape": shape, "datatype": "UINT8", **fields}


ZEROS = [0] * 3072
BINARY = {"parameters": {"binary_data_size": 3072}}
MALFORMED_JSON = {
    "a JSON array": [tensor(data=ZEROS)],
    "no inputs": {"inputs": []},
    "two inputs": {"inputs": [tensor(data=ZEROS), tensor(data=ZEROS)]},
    "an unknown field": {"inputs": [tensor(data=ZEROS)], "priority": 1},
    "an unknown input": {"inputs": [{**tensor(data=ZEROS), "name": "pixels"}]},
    "FP32 datatype": {"inputs": [{**tensor(data=ZEROS), "datatype": "FP32"}]},
    "a 3-d shape": {"inputs": [tensor([1, 32, 96], data=ZEROS)]},
    "28x28 images": {"inputs": [tensor([1, 28, 28, 3], data=[0] * 2352)]},
    "a float in the shape": {"inputs": [tensor([1.5, 32, 32, 3], data=ZEROS)]},
    "no images": {"inputs": [tensor([0, 32, 32, 3], data=[])]},
    "more images than allowed": {"inputs": [tensor([9, 32, 32, 3], data=[0] * 9 * 3072)]},
    "too little data": {"inputs": [tensor(data=ZEROS[:-1])]},
    "nested data of another shape": {"inputs": [tensor(data=[[ZEROS]])]},
    "ragged data": {"inputs": [tensor(data=[[0, 1], [2]])]},
    "floats": {"inputs": [tensor(data=[0.5] * 3072)]},
    "a value over 255": {"inputs": [tensor(data=[256, *ZEROS[1:]])]},
    "a negative value": {"inputs": [tensor(data=[-1, *ZEROS[1:]])]},
    "strings": {"inputs": [tensor(data=["0"] * 3072)]},
    "booleans": {"inputs": [tensor(data=[True] * 3072)]},
    "no data": {"inputs": [tensor()]},
    "an unknown output": {"inputs": [tensor(data=ZEROS)], "outputs": [{"name": "embeddings"}]},
    "an output twice": {"inputs": [tensor(data=ZEROS)], "outputs": [{"name": "logits"}, {"name": "logits"}]},
    "classification": {
        "inputs": [tensor(data=ZEROS)],
        "outputs": [{"name": "logits", "parameters": {"classification": 3}}],
    },
    "binary_data not a boolean": {
        "inputs": [tensor(data=ZEROS)],
        "outputs": [{"name": "logits", "parameters": {"binary_data": "yes"}}],
    },
    "binary_data_size without binary data": {"inputs": [tensor(**BINARY)]},
    "data and binary_data_size": {"inputs": [tensor(data=ZEROS, **BINARY)]},
}


def assert_v2_error(response: httpx.Response, status: int, words: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert list(body) == ["error"] and isinstance(body["error"], str), body
    assert words in body["error"], body


@pytest.mark.parametrize("request_json", MALFORMED_JSON.values(), ids=MALFORMED_JSON.keys())
def test_malformed_json_requests_are_400_with_the_protocols_error(client, request_json):
    response = client.post(INFER, json=request_json)
    assert_v2_error(response, 400, "")


def test_errors_name_what_is_wrong(client):
    cases = {
        "FP32 datatype": "is UINT8, not 'FP32'",
        "28x28 images": "[N, 32, 32, 3]",
        "more images than allowed": "from 1 to 8 per request",
        "too little data": "fits neither",
        "a value over 255": "from 0 to 255",
        "an unknown output": "'embeddings'",
        "classification": "'classification' is not supported",
    }
    for case, words in cases.items():
        assert_v2_error(client.post(INFER, json=MALFORMED_JSON[case]), 400, words)
    assert_v2_error(client.post(INFER, content=b"{not json"), 400, "not valid JSON")


def binary_request(header: dict, data: bytes, header_length: int | str | None = None) -> tuple[bytes, dict]:
    encoded = json.dumps(header).encode()
    length = len(encoded) if header_length is None else header_length
    return encoded + data, {"Inference-Header-Content-Length": str(length)}


BINARY_HEADER = {"inputs": [tensor(**BINARY)]}
MALFORMED_BINARY = {
    "a header length that is not a number": (BINARY_HEADER, bytes(3072), "many", "must be a byte count"),
    "a header length of 0": (BINARY_HEADER, bytes(3072), 0, "must be a byte count"),
    "a header length past the body": (BINARY_HEADER, bytes(3072), 10**6, "must be a byte count"),
    "a header length cutting the JSON": (BINARY_HEADER, bytes(3072), 20, "not valid JSON"),
    "too few bytes": (BINARY_HEADER, bytes(3071), None, "3071 bytes follow the header"),
    "too many bytes": (BINARY_HEADER, bytes(3073), None, "3073 bytes follow the header"),
    "a size that does not fit the shape": (
        {"inputs": [tensor(parameters={"binary_data_size": 3000})]},
        bytes(3000),
        None,
        "needs 3072",
    ),
    "a size that is not a number": (
        {"inputs": [tensor(parameters={"binary_data_size": "3072"})]},
        bytes(3072),
        None,
        "binary_data_size '3072'",
    ),
    "bytes after a JSON tensor": ({"inputs": [tensor(data=ZEROS)]}, bytes(8), None, "no input has binary_data_size"),
}


@pytest.mark.parametrize(("header", "data", "length", "words"), MALFORMED_BINARY.values(), ids=MALFORMED_BINARY.keys())
def test_malformed_binary_requests_are_400_with_the_protocols_error(client, header, data, length, words):
    body, headers = binary_request(header, data, length)
    assert_v2_error(client.post(INFER, content=body, headers=headers), 400, words)


def test_a_well_formed_binary_request_by_hand(client, images):
    """The extension's framing as the protocol writes it, read back by hand: JSON header, then raw float32."""
    body, headers = binary_request(
        {"inputs": [tensor(**BINARY)], "outputs": [{"name": "logits", "parameters": {"binary_data": True}}]},
        images[:1].tobytes(),
    )
    response = client.post(INFER, content=body, headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/octet-stream"
    length = int(response.headers["inference-header-content-length"])
    header = json.loads(response.content[:length])
    assert header["outputs"] == [
        {"name": "logits", "datatype": "FP32", "shape": [1, 10], "parameters": {"binary_data_size": 40}}
    ]
    logits = np.frombuffer(response.content[length:], dtype="<f4")
    assert logits.shape == (10,) and np.isfinite(logits).all()


def test_unknown_models_versions_paths_and_methods(client, server):
    assert_v2_error(client.post("/v2/models/nope/infer", json={}), 404, "unknown model 'nope'")
    assert_v2_error(client.get("/v2/models/nope"), 404, "unknown model 'nope'")
    assert_v2_error(client.get("/v2/models/cifarlab/versions/9"), 404, "no version '9'")
    assert_v2_error(client.post("/v2/models/cifarlab/versions/9/infer", json={}), 404, "no version '9'")
    assert client.get("/v2/models/cifarlab/ready").json() == {"name": "cifarlab", "ready": True}
    assert_v2_error(client.get("/v2/repository/index"), 404, "no such v2 endpoint")
    refused = client.get(INFER)
    assert_v2_error(refused, 405, "method GET not allowed")
    assert refused.headers["allow"] == "POST"
    assert_v2_error(httpx.get(f"{server.url}/v2/models/cifarlab"), 401, "X-API-Key")
    assert httpx.get(f"{server.url}/v2/health/live").json() == {"live": True}  # probes need no key
    assert httpx.get(f"{server.url}/v2/health/ready").json() == {"ready": True}


def test_every_reference_in_the_openapi_document_resolves(client):
    """The infer body's schema is pydantic's, whose `#/$defs/RequestInput` pointed at the document's root: nothing
    there (schemathesis could not generate those bodies from it). Every `$ref` must name a part of the document."""
    document = client.get("/openapi.json").raise_for_status().json()

    def references(node: object) -> Iterator[str]:
        if isinstance(node, dict):
            if isinstance(node.get("$ref"), str):
                yield node["$ref"]
            for value in node.values():
                yield from references(value)
        elif isinstance(node, list):
            for value in node:
                yield from references(value)

    unresolved = []
    for reference in set(references(document)):
        target: object = document
        for part in reference.removeprefix("#/").split("/"):
            part = part.replace("~1", "/").replace("~0", "~")
            target = target.get(part) if isinstance(target, dict) else None
        if not reference.startswith("#/") or target is None:
            unresolved.append(reference)
    assert unresolved == []
    body = document["paths"][INFER.replace("cifarlab", "{model_name}")]["post"]["requestBody"]
    tensor_schema = body["content"]["application/json"]["schema"]["properties"]["inputs"]["items"]
    assert tensor_schema["required"] == ["name", "shape", "datatype"]  # RequestInput, in place


def test_compressed_and_oversized_bodies_are_refused(client):
    body = json.dumps({"inputs": [tensor(data=ZEROS)]}).encode()
    assert_v2_error(client.post(INFER, content=body, headers={"Content-Encoding": "gzip"}), 415, "gzip")
    too_big = bytes(256 * 1024 + 1)
    assert_v2_error(client.post(INFER, content=too_big), 413, "over the limit")  # by its Content-Length

    def chunks() -> Iterator[bytes]:
        yield from (too_big[i : i + 65536] for i in range(0, len(too_big), 65536))

    assert_v2_error(client.post(INFER, content=chunks()), 413, "over the limit")  # counted as it arrives


@pytest.fixture(scope="module")
def ab_v2_server(onnx_model: Path, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """Two versions of `cifarlab` as A/B variants (the trained model and an untrained one), feedback on."""
    folder = tmp_path_factory.mktemp("v2-ab")
    variants = {
        "champion": {"model_uri": str(onnx_model), "weight": 1},
        "canary": {"model_uri": str(shutil.copy(tiny_model, folder / "canary.onnx")), "weight": 1},
    }
    env = {"VARIANTS": json.dumps(variants), "FEEDBACK_DIR": str(folder / "feedback"), "DRIFT_WINDOW": "20"}
    server = Server(env, folder / "server.log").start()
    yield server
    server.stop()


def png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (10, 200, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_v2_uses_the_same_variants_feedback_drift_and_metrics_as_v1(ab_v2_server, images):
    answered = {"champion": 0, "canary": 0}  # images each variant scored
    with httpx.Client(base_url=ab_v2_server.url, timeout=30) as http:
        versions = {name: http.get("/v1/model", params={"variant": name}).json()["version"] for name in answered}
        assert http.get("/v2/models/cifarlab").json()["versions"] == sorted(versions.values())
        body = {"inputs": [tensor([2, 32, 32, 3], data=images[:2].ravel().tolist())]}
        for client_id in ("alice", "bob", "carol", "dave"):  # sticky: /v2 answers each client with /v1's variant
            files = [("files", ("a.png", png(), "image/png"))]
            v1 = http.post("/v1/predict", files=files, headers={"X-Client-ID": client_id}).json()
            v2 = http.post(INFER, json=body, headers={"X-Client-ID": client_id}).json()
            assert v2["parameters"]["variant"] == v1["variant"]
            assert v2["model_version"] == versions[v1["variant"]]
            answered[v1["variant"]] += 3
        for name, version in versions.items():  # a version names its variant, whatever the client id
            path = f"/v2/models/cifarlab/versions/{version}/infer"
            answer = http.post(path, json=body, headers={"X-Client-ID": "alice"}).json()
            assert answer["parameters"]["variant"] == name and answer["model_version"] == version
            answered[name] += 2
        prediction_ids = answer["parameters"]["prediction_ids"]
        assert len(prediction_ids) == 2 and len(set(prediction_ids)) == 2, prediction_ids  # one per image
        prediction_id = prediction_ids[0]
        feedback = http.post("/v1/feedback", json={"prediction_id": prediction_id, "label": "cat"})
        assert feedback.status_code == 201, feedback.text
        assert feedback.json()["variant"] == "canary" and feedback.json()["version"] == versions["canary"]
        drift = http.get("/v1/drift").json()["variants"]["champion"]  # the trained model carries its reference
        assert drift["observed"] == answered["champion"]
        metrics = http.get("/metrics").text.splitlines()
        route = 'route="/v2/models/{model_name}/versions/{model_version}/infer"'
        assert any(route in line and 'status="200"' in line and 'variant="canary"' in line for line in metrics)
