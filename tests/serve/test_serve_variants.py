"""serve.variants: weighted, sticky A/B assignment and shadow variants."""

import pytest
from pydantic import ValidationError

from serve.variants import Assignment, VariantRouter, VariantSpec


def specs(**weights: float | str) -> dict[str, VariantSpec]:
    """name=weight, or name="shadow"."""
    return {
        name: VariantSpec(model_uri=f"{name}.onnx", shadow=True)
        if weight == "shadow"
        else VariantSpec(model_uri=f"{name}.onnx", weight=weight)
        for name, weight in weights.items()
    }


@pytest.mark.parametrize(
    "variants",
    [specs(a=0, b=0), specs(a="shadow"), {}],
)
def test_router_needs_an_answering_variant(variants: dict[str, VariantSpec]) -> None:
    with pytest.raises(ValueError, match="at least one variant must answer"):
        VariantRouter(variants)


def test_a_spec_refuses_negative_weights_and_unknown_keys() -> None:
    with pytest.raises(ValidationError, match="greater than or equal to 0"):
        VariantSpec(model_uri="m.onnx", weight=-1)
    with pytest.raises(ValidationError, match="Extra inputs"):
        VariantSpec.model_validate({"model_uri": "m.onnx", "weigth": 2})


def test_assignment_is_sticky_per_client_and_follows_the_weights() -> None:
    router = VariantRouter(specs(champion=90, challenger=10))
    assert router.shares() == pytest.approx({"champion": 0.9, "challenger": 0.1})
    answers = [router.assign(f"client-{i}").answer for i in range(20_000)]
    assert answers.count("challenger") / len(answers) == pytest.approx(0.1, abs=0.01)
    assert all(router.assign(f"client-{i}").answer == answers[i] for i in range(0, 20_000, 97))
    other = VariantRouter(specs(champion=90, challenger=10))  # a restart, another replica
    assert [other.assign(f"client-{i}").answer for i in range(500)] == answers[:500]


def test_without_a_client_id_each_request_is_drawn_at_random() -> None:
    router = VariantRouter(specs(a=1, b=1), seed=0)
    answers = [router.assign(None).answer for _ in range(4000)]
    assert answers.count("a") / len(answers) == pytest.approx(0.5, abs=0.04)
    assert router.assign("").answer in {"a", "b"}


def test_shadow_variants_see_every_request_but_never_answer() -> None:
    router = VariantRouter(specs(champion=100, challenger="shadow"))
    assignments = {router.assign(f"c{i}") for i in range(200)} | {router.assign(None)}
    assert assignments == {Assignment("champion", ("challenger",))}
    assert router.shares() == {"champion": 1.0, "challenger": 0.0}
