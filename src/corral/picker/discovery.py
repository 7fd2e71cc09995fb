"""Which pods there are: a static list, or the ready endpoints of a Kubernetes Service.

``Discovery`` is what ``Picker`` reads: ``endpoints()`` ("ip:port", now) and ``changed()``, an
event set when they change. ``KubernetesDiscovery`` lists the Service's EndpointSlices (label
``kubernetes.io/service-name``) and then watches them with lightkube, re-listing every
``resync`` seconds so a missed event costs at most that long; an API error is logged and retried
with a growing delay, keeping the last endpoints known meanwhile (a picker cut off from the API
server keeps routing to the pods it knew, and their views say which still answer).

Why lightkube: typed models of every Kubernetes resource (mypy strict keeps working), asyncio
watches that re-connect on their own, in-cluster and kubeconfig credentials, and a small,
actively released package; kubernetes_asyncio is the generated OpenAPI client, untyped.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING, Protocol

import structlog

from corral.picker.config import KubernetesPods, PickerConfig

if TYPE_CHECKING:
    from lightkube import KubeConfig
    from lightkube.resources.discovery_v1 import EndpointSlice

log = structlog.get_logger("corral.picker")

SERVICE_LABEL = "kubernetes.io/service-name"


class Discovery(Protocol):
    """The set of pods the picker reads and picks among."""

    def endpoints(self) -> list[str]: ...
    def changed(self) -> asyncio.Event: ...
    async def start(self) -> None: ...
    async def aclose(self) -> None: ...


class StaticDiscovery:
    """A fixed list of pods (``pods: ["10.0.0.5:8080", ...]``)."""

    def __init__(self, endpoints: list[str]) -> None:
        self._endpoints = list(dict.fromkeys(endpoints))
        self._changed = asyncio.Event()

    def endpoints(self) -> list[str]:
        return list(self._endpoints)

    def changed(self) -> asyncio.Event:
        return self._changed

    async def start(self) -> None:
        pass

    async def aclose(self) -> None:
        pass


def endpoint_of(address: str, port: int) -> str:
    """``ip:port``, bracketing an IPv6 address."""
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


class KubernetesDiscovery:
    """The ready endpoints of a Service, from its EndpointSlices, kept current by a watch."""

    def __init__(self, pods: KubernetesPods, *, kubeconfig: KubeConfig | None = None,
                 resync: float = 60.0, max_delay: float = 30.0) -> None:
        self.pods = pods
        # None: the pod's service account in a cluster, else $KUBECONFIG or ~/.kube/config.
        self.kubeconfig = kubeconfig
        self.max_delay = max_delay      # the longest wait between two failed attempts
        self.resync = resync
        self._slices: dict[str, list[str]] = {}     # slice name -> its ready endpoints
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._synced = asyncio.Event()
        self.failures = 0           # list or watch attempts that failed, in a row

    def endpoints(self) -> list[str]:
        return sorted({e for es in self._slices.values() for e in es})

    def changed(self) -> asyncio.Event:
        return self._changed

    async def start(self, wait: float = 10.0) -> None:
        """Start watching; waits up to ``wait`` seconds for the first listing."""
        self._task = asyncio.create_task(self._run(), name="picker-discovery")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait):
                await self._synced.wait()

    async def aclose(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def _ready(self, slice_: EndpointSlice) -> list[str]:
        labels = (slice_.metadata.labels if slice_.metadata else None) or {}
        if labels.get(SERVICE_LABEL) != self.pods.service:
            return []       # not the Service's (an API that ignored the selector)
        out = []
        for endpoint in slice_.endpoints or ():
            conditions = endpoint.conditions
            # Kubernetes: an unset "ready" means ready; a terminating pod is not ready.
            if conditions is not None and conditions.ready is False:
                continue
            if endpoint.addresses:
                out.append(endpoint_of(endpoint.addresses[0], self.pods.port))
        return out

    def _set(self, name: str, endpoints: list[str] | None) -> None:
        before = self.endpoints()
        if endpoints is None:
            self._slices.pop(name, None)
        else:
            self._slices[name] = endpoints
        if self.endpoints() != before:
            log.info("picker_pods_changed", pods=self.endpoints())
            self._changed.set()

    async def _run(self) -> None:
        from lightkube import AsyncClient
        from lightkube.core.client import LabelSelector
        from lightkube.resources.discovery_v1 import EndpointSlice

        client: AsyncClient | None = None
        labels: LabelSelector = {SERVICE_LABEL: self.pods.service}
        delay = 1.0
        try:
            while True:
                try:
                    if client is None:      # no credentials found: retried like the API
                        client = AsyncClient(config=self.kubeconfig,
                                             namespace=self.pods.namespace)
                    listed = {}
                    async for item in client.list(EndpointSlice, labels=labels,
                                                  namespace=self.pods.namespace):
                        name = (item.metadata.name if item.metadata else None) or ""
                        listed[name] = self._ready(item)
                    for name in set(self._slices) - set(listed):
                        self._set(name, None)
                    for name, endpoints in listed.items():
                        self._set(name, endpoints)
                    self._synced.set()
                    delay, self.failures = 1.0, 0
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(self.resync):
                            async for op, item in client.watch(
                                    EndpointSlice, labels=labels, namespace=self.pods.namespace):
                                name = (item.metadata.name if item.metadata else None) or ""
                                self._set(name, None if op == "DELETED" else self._ready(item))
                except asyncio.CancelledError:
                    raise
                except Exception as exc:   # the API server away, RBAC missing: keep the last
                    self.failures += 1
                    log.warning("picker_discovery_failed", error=f"{type(exc).__name__}: {exc}",
                                retry_in=min(delay, self.max_delay))
                    await asyncio.sleep(min(delay, self.max_delay))
                    delay = min(delay * 2, self.max_delay)
        finally:
            if client is not None:
                await client.close()


def discovery_for(config: PickerConfig) -> Discovery:
    """The discovery the config names."""
    if isinstance(config.pods, list):
        return StaticDiscovery(config.pods)
    return KubernetesDiscovery(config.pods.kubernetes)
