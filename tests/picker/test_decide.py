"""The decision, from pod views shaped as corral's /admin/status (with the contract's fields)."""

from __future__ import annotations

from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from corral.picker.decide import Affinity, decide
from corral.picker.view import Fit, ModelView, PodView

NOT_LOADED = Fit(now=False, after_evicting_idle=False)
FITS = Fit(now=True, after_evicting_idle=True)
EVICTING = Fit(now=False, after_evicting_idle=True, evict=("old",))


def ready(name: str, slots: int = 2, free: int = 2, queue: int = 0, limit: int = 8,
          aliases: tuple[str, ...] = ()) -> ModelView:
    return ModelView(name, aliases, "ready", slots, free, queue, limit)


def stopped(name: str, fit: Fit = NOT_LOADED) -> ModelView:
    return ModelView(name, (), "unloaded", 0, 0, 0, 8, fit)


def pod(endpoint: str, *models: ModelView, up: bool = True, draining: bool = False) -> PodView:
    return PodView(endpoint, up, tuple(models), draining)


def test_loaded_with_a_free_slot_first_then_most_free() -> None:
    pods = [pod("a:1", stopped("smol", FITS)), pod("b:1", ready("smol", free=1)),
            pod("c:1", ready("smol", free=2))]
    decision = decide("smol", pods)
    assert decision.endpoints == ("c:1", "b:1", "a:1")
    assert decision.reason == "loaded_free" and decision.status is None


def test_loaded_with_the_shortest_queue_before_loading_elsewhere() -> None:
    pods = [pod("a:1", ready("smol", free=0, queue=3)), pod("b:1", ready("smol", free=0, queue=1)),
            pod("c:1", stopped("smol", FITS))]
    decision = decide("smol", pods)
    assert decision.endpoints == ("b:1", "a:1", "c:1")
    assert decision.reason == "loaded_queue"


def test_where_it_fits_now_before_where_it_fits_after_evicting() -> None:
    pods = [pod("a:1", stopped("smol", EVICTING)), pod("b:1", stopped("smol", FITS)),
            pod("c:1", stopped("smol"))]
    assert decide("smol", pods).endpoints == ("b:1", "a:1")
    assert decide("smol", pods).reason == "fits"
    only_evicting = decide("smol", [pods[0], pods[2]])
    assert (only_evicting.endpoints, only_evicting.reason) == (("a:1",), "fits_after_evicting")


def test_fits_prefers_the_least_loaded_pod() -> None:
    busy = pod("a:1", stopped("smol", FITS), ready("other", slots=4, free=0, queue=2))
    idle = pod("b:1", stopped("smol", FITS), ready("other", slots=4, free=4))
    assert decide("smol", [busy, idle]).endpoints == ("b:1", "a:1")


def test_full_everywhere_is_429_with_retry_after() -> None:
    pods = [pod("a:1", ready("smol", free=0, queue=8)), pod("b:1", stopped("smol"))]
    decision = decide("smol", pods, retry_after=2.5)
    assert (decision.endpoints, decision.reason, decision.status, decision.retry_after) == (
        (), "full", 429, 2.5)


def test_no_pods_up_is_503() -> None:
    assert decide("smol", []).status == 503
    decision = decide("smol", [pod("a:1", ready("smol"), up=False),
                               pod("b:1", ready("smol"), draining=True)])
    assert (decision.reason, decision.status, decision.retry_after) == ("no_pods", 503, 1.0)


def test_only_down_pods_know_the_model_is_503_not_404() -> None:
    decision = decide("smol", [pod("a:1", ready("smol"), up=False), pod("b:1", ready("x"))])
    assert (decision.reason, decision.status) == ("no_pods", 503)


def test_a_model_no_pod_knows_is_404() -> None:
    decision = decide("nope", [pod("a:1", ready("smol"))])
    assert (decision.endpoints, decision.reason, decision.status) == ((), "unknown_model", 404)
    assert decision.retry_after is None


def test_aliases_and_ollama_latest_count() -> None:
    pods = [pod("a:1", ready("smollm2", aliases=("smol",))), pod("b:1", stopped("smollm2"))]
    for name in ("smollm2", "smol", "smol:latest", "smollm2:latest"):
        assert decide(name, pods).endpoints == ("a:1",), name
    assert decide("smol:3b", pods).reason == "unknown_model"


def test_no_model_goes_to_any_healthy_pod_least_loaded_first() -> None:
    pods = [pod("a:1", ready("x", free=0)), pod("b:1", ready("x")), pod("c:1", up=False)]
    decision = decide(None, pods)
    assert (decision.endpoints, decision.reason) == (("b:1", "a:1"), "no_model")


def test_what_was_sent_since_the_last_view_counts() -> None:
    pods = [pod("a:1", ready("smol", free=1)), pod("b:1", ready("smol", free=1, queue=0))]
    first = decide("smol", pods)
    assert first.endpoints[0] == "a:1"
    second = decide("smol", pods, in_flight={("a:1", "smol"): 1})
    assert second.endpoints == ("b:1", "a:1") and second.reason == "loaded_free"
    third = decide("smol", pods, in_flight={("a:1", "smol"): 1, ("b:1", "smol"): 1})
    assert third.reason == "loaded_queue"


def test_a_model_just_sent_to_an_unloaded_pod_counts_as_loading_there() -> None:
    pods = [pod("a:1", stopped("smol", FITS)), pod("b:1", stopped("smol", FITS))]
    assert decide("smol", pods).endpoints[0] == "a:1"
    again = decide("smol", pods, in_flight={("a:1", "smol"): 1})
    assert (again.endpoints[0], again.reason) == ("a:1", "loaded_queue")


def test_affinity_sticks_to_one_pod_per_session() -> None:
    pods = [pod(f"p{i}:1", ready("smol", slots=4, free=4)) for i in range(5)]
    firsts = {key: decide("smol", pods, affinity=Affinity(key)).endpoints[0]
              for key in (f"session-{n}" for n in range(50))}
    for key, first in firsts.items():
        decision = decide("smol", pods, affinity=Affinity(key))
        assert decision.endpoints[0] == first and decision.reason == "affinity"
        assert sorted(decision.endpoints) == sorted(p.endpoint for p in pods)
    assert len(set(firsts.values())) >= 3     # sessions spread over the pods


def test_affinity_falls_back_when_the_preferred_pod_is_over_max_load() -> None:
    pods = [pod(f"p{i}:1", ready("smol", slots=4, free=4)) for i in range(3)]
    preferred = decide("smol", pods, affinity=Affinity("s")).endpoints[0]
    loaded = [pod(p.endpoint, ready("smol", slots=4, free=0, queue=2)) if p.endpoint == preferred
              else p for p in pods]
    decision = decide("smol", loaded, affinity=Affinity("s", max_load=1.25))
    assert decision.endpoints[0] != preferred
    assert decision.reason == "affinity"


def test_affinity_never_sends_to_a_pod_that_has_not_loaded_the_model_over_one_that_has() -> None:
    pods = [pod(f"p{i}:1", stopped("smol", FITS)) for i in range(4)] + [pod("z:1", ready("smol"))]
    for n in range(20):
        assert decide("smol", pods, affinity=Affinity(f"k{n}")).endpoints[0] == "z:1"


# Property tests over arbitrary fleets.
models = st.sampled_from(["a", "b", "c"])
fits = st.sampled_from([None, NOT_LOADED, FITS, EVICTING])


@st.composite
def model_views(draw: st.DrawFn, name: str) -> ModelView:
    state = draw(st.sampled_from(["ready", "starting", "unloaded", "failed"]))
    slots = draw(st.integers(1, 4))
    return ModelView(name, (), state, slots, draw(st.integers(0, slots)),
                     draw(st.integers(0, 5)), draw(st.integers(1, 5)),
                     draw(fits) if state in ("unloaded", "failed") else None)


@st.composite
def fleets(draw: st.DrawFn) -> list[PodView]:
    n = draw(st.integers(0, 6))
    pods = []
    for i in range(n):
        names = draw(st.sets(models, max_size=3))
        pods.append(PodView(f"10.0.0.{i}:8080", draw(st.booleans() | st.just(True)),
                            tuple(draw(model_views(name)) for name in sorted(names)),
                            draw(st.booleans() | st.just(False) | st.just(False))))
    return pods


@settings(max_examples=400, deadline=None)
@given(fleet=fleets(), model=st.none() | models, key=st.none() | st.text(max_size=8))
def test_decisions_are_well_formed_and_only_name_healthy_pods(
        fleet: list[PodView], model: str | None, key: str | None) -> None:
    decision = decide(model, fleet, affinity=Affinity(key) if key is not None else None)
    healthy = {p.endpoint for p in fleet if p.up and not p.draining}
    assert len(set(decision.endpoints)) == len(decision.endpoints)
    assert set(decision.endpoints) <= healthy
    if decision.endpoints:
        assert decision.status is None
        if model is not None:
            # Every pod named has the model loaded, loading, or room for it.
            for endpoint in decision.endpoints:
                view = next(p for p in fleet if p.endpoint == endpoint).find(model)
                assert view is not None
                assert view.serving or view.loading or (
                    view.fit is not None and view.fit.after_evicting_idle)
            # No pod with the model loaded and a free slot is passed over for one without.
            free = [p.endpoint for p in fleet if p.endpoint in healthy
                    and (m := p.find(model)) and m.serving and m.slots_free > 0]
            if free and decision.reason != "affinity":
                assert decision.endpoints[0] in free
    else:
        assert decision.status in (404, 429, 503)
        assert (decision.retry_after is None) == (decision.status == 404)
        if not healthy:
            assert decision.reason == "no_pods"


@settings(max_examples=200, deadline=None)
@given(fleet=fleets(), model=models)
def test_decide_is_pure(fleet: list[PodView], model: str) -> None:
    sent = Counter({(p.endpoint, model): 1 for p in fleet[:2]})
    assert decide(model, fleet, in_flight=sent) == decide(model, fleet, in_flight=dict(sent))


def test_a_model_refusing_requests_on_a_pod_is_no_candidate_there() -> None:
    for state in ("failed", "given_up", "retiring", "retired"):
        pods = [pod("a:1", ModelView("smol", (), state, 2, 2, 0, 8, FITS)),
                pod("b:1", stopped("smol", EVICTING))]
        decision = decide("smol", pods)
        assert decision.endpoints == ("b:1",), state
    alone = decide("smol", [pod("a:1", ModelView("smol", (), "given_up", 0, 0, 0, 8, FITS))])
    assert (alone.reason, alone.status) == ("full", 429)


def test_a_crashed_model_waits_for_its_restart_like_a_loading_one() -> None:
    pods = [pod("a:1", ModelView("smol", (), "crashed", 0, 0, 1, 8)),
            pod("b:1", stopped("smol", FITS))]
    decision = decide("smol", pods)
    assert (decision.endpoints, decision.reason) == (("a:1", "b:1"), "loaded_queue")
