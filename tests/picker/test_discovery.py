"""Discovery from a Service's EndpointSlices, served by a Kubernetes API double (kmock's
emulator: a real HTTP server speaking the list and watch API), changing while the picker picks.
"""

from __future__ import annotations

import asyncio
from typing import Any

import kmock
from lightkube import AsyncClient, KubeConfig
from lightkube.resources.discovery_v1 import EndpointSlice
from lightkube.types import PatchType

from corral.picker.config import KubernetesPods
from corral.picker.discovery import KubernetesDiscovery, endpoint_of
from corral.picker.picker import Picker
from corral.picker.view import StatusReader
from tests.conftest import free_port, until
from tests.picker.status_pods import StatusPod, model, serving, status


def kubeconfig(server: str) -> KubeConfig:
    return KubeConfig.from_dict({
        "clusters": [{"name": "double", "cluster": {"server": server}}],
        "users": [{"name": "picker", "user": {"token": "not-checked"}}],
        "contexts": [{"name": "double", "context": {"cluster": "double", "user": "picker"}}],
        "current-context": "double",
    })


def endpoint_slice(name: str, addresses: dict[str, bool], service: str = "corral",
                   port: int = 8080) -> EndpointSlice:
    body: dict[str, Any] = {
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": "llm",
                     "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
        "endpoints": [{"addresses": [ip], "conditions": {"ready": ready}}
                      for ip, ready in addresses.items()],
    }
    return EndpointSlice.from_dict(body)


async def change(api: AsyncClient, name: str, addresses: dict[str, bool]) -> None:
    """The slice's endpoints now (as the EndpointSlice controller patches them)."""
    endpoints = endpoint_slice(name, addresses).to_dict()["endpoints"]
    await api.patch(EndpointSlice, name, {"endpoints": endpoints}, namespace="llm",
                    patch_type=PatchType.MERGE)


async def test_endpoint_slices_changing_while_the_picker_picks(
        kmock: kmock.KubernetesEmulator) -> None:
    port = free_port()
    ep = {n: endpoint_of(f"127.0.0.{n}", port) for n in (2, 3, 4)}
    pods = {ep[2]: StatusPod(status(model("smol", free=1))),
            ep[3]: StatusPod(status(model("smol", free=2))),
            ep[4]: StatusPod(status(model("smol", free=4)))}
    api = AsyncClient(config=kubeconfig(str(kmock.url)), namespace="llm")
    await api.create(endpoint_slice("corral-a", {"127.0.0.2": True, "127.0.0.3": False}))
    # Another Service's slice in the same namespace: never a pod of this one.
    await api.create(endpoint_slice("other-a", {"127.0.0.4": True}, service="other"))
    discovery = KubernetesDiscovery(
        KubernetesPods(namespace="llm", service="corral", port=port),
        kubeconfig=kubeconfig(str(kmock.url)), resync=30)
    picker = Picker(discovery, StatusReader(None, timeout=2.0), refresh=0.2)
    async with serving(pods):
        await picker.start()
        try:
            assert discovery.endpoints() == [ep[2]]     # 127.0.0.3 is not ready
            decision = await picker.pick("smol", {})
            assert decision.endpoints == (ep[2],)
            # Requests keep coming while the slices change: every one is answered with pods.
            picked: list[tuple[str, ...]] = []

            async def traffic() -> None:
                while True:
                    picked.append((await picker.pick("smol", {})).endpoints)
                    await asyncio.sleep(0.005)

            flowing = asyncio.create_task(traffic())

            # 127.0.0.3 becomes ready, and a second slice adds 127.0.0.4: both are picked
            # from (most free slots first) as soon as their views are read.
            await change(api, "corral-a", {"127.0.0.2": True, "127.0.0.3": True})
            await api.create(endpoint_slice("corral-b", {"127.0.0.4": True}))
            await until(lambda: all(picker.views.get(ep[n]) and picker.views[ep[n]].up
                                    for n in (2, 3, 4)))
            assert (await picker.pick("smol", {})).endpoints == (ep[4], ep[3], ep[2])

            # The second slice goes, and 127.0.0.2 terminates: only 127.0.0.3 is left.
            await api.delete(EndpointSlice, "corral-b", namespace="llm")
            await change(api, "corral-a", {"127.0.0.2": False, "127.0.0.3": True})
            await until(lambda: list(picker.views) == [ep[3]])
            assert (await picker.pick("smol", {})).endpoints == (ep[3],)
            assert picker.registry.get_sample_value("corral_picker_pods", {"state": "seen"}) == 1
            flowing.cancel()
            # None refused while pods came and went.
            assert picked and all(picked), picked
            assert {e for es in picked for e in es} <= set(ep.values())
        finally:
            await picker.aclose()
            await api.close()


async def test_the_api_server_away_keeps_the_last_pods(kmock: kmock.KubernetesEmulator) -> None:
    api = AsyncClient(config=kubeconfig(str(kmock.url)), namespace="llm")
    await api.create(endpoint_slice("corral-a", {"127.0.0.2": True}))
    await api.close()
    discovery = KubernetesDiscovery(KubernetesPods(namespace="llm", service="corral", port=80),
                                    kubeconfig=kubeconfig(str(kmock.url)), resync=0.2,
                                    max_delay=0.2)
    await discovery.start()
    try:
        assert discovery.endpoints() == ["127.0.0.2:80"]
        # The double now fails every request: the endpoints known stay.
        kmock << 500
        await until(lambda: discovery.failures >= 3)
        assert discovery.endpoints() == ["127.0.0.2:80"]
    finally:
        await discovery.aclose()
