"""``Picker`` over pods read for real over HTTP: refreshes, in-flight counts, metrics, status."""

from __future__ import annotations

from prometheus_client import generate_latest

from corral.picker.discovery import StaticDiscovery
from corral.picker.picker import Picker
from corral.picker.view import StatusReader
from tests.conftest import free_port, until
from tests.picker.status_pods import StatusPod, model, serving, status


def sample(picker: Picker, name: str, **labels: str) -> float | None:
    return picker.registry.get_sample_value(name, labels)


async def test_picks_from_fresh_views_and_follows_changes() -> None:
    port = free_port()
    a, b = f"127.0.0.2:{port}", f"127.0.0.3:{port}"
    pods = {a: StatusPod(status(model("smol", free=1)), key="k"),
            b: StatusPod(status(model("smol", "unloaded")), key="k")}
    picker = Picker(StaticDiscovery([a, b]), StatusReader("k", timeout=2.0), refresh=0.1)
    async with serving(pods):
        await picker.start()
        try:
            first = await picker.pick("smol", {})
            assert (first.endpoints, first.reason) == ((a, b), "loaded_free")
            picker.note_sent(a, "smol")
            # The one free slot is taken by what was just sent; the next waits in a's queue
            # rather than loading a second copy on b.
            second = await picker.pick("smol", {})
            assert (second.endpoints[0], second.reason) == (a, "loaded_queue")
            # a's queue fills up: b, where it fits, is next.
            pods[a].body = status(model("smol", free=0, queue=8, limit=8))
            reads = pods[a].requests
            await until(lambda: pods[a].requests > reads + 1)
            third = await picker.pick("smol:latest", {})
            assert (third.endpoints, third.reason) == ((b,), "fits")
            assert sample(picker, "corral_picker_decisions_total", reason="fits") == 1
            assert sample(picker, "corral_picker_pods", state="up") == 2
            age = sample(picker, "corral_picker_view_age_seconds", pod=a)
            assert age is not None and 0 <= age < 30
            fleet = picker.status()
            assert [p["endpoint"] for p in fleet["pods"]] == [a, b]
            assert fleet["totals"] == {"pods": 2, "pods_up": 2, "slots": 2, "slots_free": 0,
                                       "queue_depth": 8}
            assert fleet["decisions"]["loaded_free"] == 1
        finally:
            await picker.aclose()


async def test_a_pod_that_stops_answering_is_marked_down_and_avoided() -> None:
    port = free_port()
    a, b = f"127.0.0.2:{port}", f"127.0.0.3:{port}"
    pods = {a: StatusPod(status(model("smol", free=2))),
            b: StatusPod(status(model("smol", free=1)))}
    picker = Picker(StaticDiscovery([a, b]), StatusReader(None, timeout=1.0), refresh=0.1)
    async with serving({a: pods[a]}):
        async with serving({b: pods[b]}):
            await picker.start()
            try:
                assert (await picker.pick("smol", {})).endpoints == (a, b)
            except BaseException:
                await picker.aclose()
                raise
        try:
            await until(lambda: not picker.views[b].up)
            decision = await picker.pick("smol", {})
            assert decision.endpoints == (a,)
            assert picker.views[b].error
            assert sample(picker, "corral_picker_pods", state="seen") == 2
            assert sample(picker, "corral_picker_pods", state="up") == 1
        finally:
            await picker.aclose()


async def test_a_refused_key_marks_the_pod_down_saying_why() -> None:
    endpoint = f"127.0.0.2:{free_port()}"
    pod = StatusPod(status(model("smol")), key="right")
    picker = Picker(StaticDiscovery([endpoint]), StatusReader("wrong"), refresh=0.1)
    async with serving({endpoint: pod}):
        await picker.start()
        try:
            decision = await picker.pick("smol", {})
            assert (decision.reason, decision.status) == ("no_pods", 503)
            assert picker.views[endpoint].error == "/admin/status answered 401"
        finally:
            await picker.aclose()


async def test_metrics_text_names_every_reason() -> None:
    picker = Picker(StaticDiscovery(["127.0.0.2:9"]), StatusReader(None, timeout=0.5))
    await picker.refresh_now()
    text = generate_latest(picker.registry).decode()
    for reason in ("loaded_free", "full", "no_pods", "unknown_model"):
        assert f'corral_picker_decisions_total{{reason="{reason}"}} 0.0' in text
    assert 'corral_picker_pods{state="seen"} 1.0' in text
    assert (await picker.pick(None, {})).status == 503
    await picker.aclose()


async def test_session_affinity_by_header() -> None:
    port = free_port()
    endpoints = [f"127.0.0.{n}:{port}" for n in (2, 3, 4)]
    pods = {e: StatusPod(status(model("smol", slots=4, free=4))) for e in endpoints}
    picker = Picker(StaticDiscovery(endpoints), StatusReader(None), refresh=0.1,
                    affinity_header="X-Session-Id")
    async with serving(pods):
        await picker.start()
        try:
            sticky = {}
            for session in ("alice", "bob", "carol", "dave"):
                first = await picker.pick("smol", {"x-session-id": session})
                again = await picker.pick("smol", {"x-session-id": session})
                assert first.reason == again.reason == "affinity"
                assert first.endpoints[0] == again.endpoints[0]
                sticky[session] = first.endpoints[0]
            # The preferred pod of alice fills up (and its queue): she goes elsewhere.
            full = sticky["alice"]
            pods[full].body = status(model("smol", slots=4, free=0, queue=8, limit=8))
            reads = pods[full].requests
            await until(lambda: pods[full].requests > reads + 1)
            moved = await picker.pick("smol", {"x-session-id": "alice"})
            assert moved.endpoints[0] != full and full not in moved.endpoints
            # No header: no affinity.
            assert (await picker.pick("smol", {})).reason == "loaded_free"
        finally:
            await picker.aclose()
