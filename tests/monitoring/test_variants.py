"""serve.variants: weighted, sticky A/B assignment and shadow variants."""

import pytest

from serve.variants import Assignment, Variant, VariantRouter, parse_variants


def test_parse_variants() -> None:
    assert parse_variants("champion=90, challenger=10") == [Variant("champion", 90.0), Variant("challenger", 10.0)]
    assert parse_variants("champion=100,challenger=shadow") == [
        Variant("champion", 100.0),
        Variant("challenger", 0.0, shadow=True),
    ]


@pytest.mark.parametrize(
    ("spec", "message"),
    [("champion", "expected name=weight"), ("champion=lots", "not a number"), ("=5", "expected name=weight")],
)
def test_parse_variants_errors(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_variants(spec)


@pytest.mark.parametrize(
    ("variants", "message"),
    [
        ([Variant("a", 1), Variant("a", 2)], "unique"),
        ([Variant("a", 0), Variant("b", 0)], "at least one answering variant"),
        ([Variant("a", 5), Variant("b", -1)], ">= 0"),
        ([Variant("a", 0, shadow=True)], "at least one answering variant"),
    ],
)
def test_router_rejects_impossible_configurations(variants: list[Variant], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        VariantRouter(variants)


def test_assignment_is_sticky_per_client_and_follows_the_weights() -> None:
    router = VariantRouter(parse_variants("champion=90,challenger=10"))
    assert router.shares() == pytest.approx({"champion": 0.9, "challenger": 0.1})
    answers = [router.assign(f"client-{i}").answer for i in range(20_000)]
    assert answers.count("challenger") / len(answers) == pytest.approx(0.1, abs=0.01)
    assert all(router.assign(f"client-{i}").answer == answers[i] for i in range(0, 20_000, 97))
    other = VariantRouter(parse_variants("champion=90,challenger=10"))  # a restart, another replica
    assert [other.assign(f"client-{i}").answer for i in range(500)] == answers[:500]


def test_without_a_client_id_each_request_is_drawn_at_random() -> None:
    router = VariantRouter(parse_variants("a=1,b=1"), seed=0)
    answers = [router.assign(None).answer for _ in range(4000)]
    assert answers.count("a") / len(answers) == pytest.approx(0.5, abs=0.04)
    assert router.assign("").answer in {"a", "b"}


def test_shadow_variants_see_every_request_but_never_answer() -> None:
    router = VariantRouter(parse_variants("champion=100,challenger=shadow"))
    assignments = {router.assign(f"c{i}") for i in range(200)} | {router.assign(None)}
    assert assignments == {Assignment("champion", ("challenger",))}
    assert router.shares() == {"champion": 1.0, "challenger": 0.0}
