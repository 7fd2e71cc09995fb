"""An Envoy bootstrap as a Gateway API implementation configures Envoy for an InferencePool.

One listener whose HTTP filters are ``ext_proc`` (corral's picker, request body STREAMED) and
the router; the route sends every request to an ORIGINAL_DST cluster keyed by the header
``x-gateway-destination-endpoint`` that the picker sets. With ``fail_open`` the filter has
``failure_mode_allow: true`` and a second route (taken when the header is absent, i.e. the
picker could not be reached) leads to a plain round-robin cluster of the pods, as gateways that
fail open do; without it Envoy answers 500 when the picker is down.

Used by the Envoy test and ``bench/fleet.py``; also a starting point for plain Envoy in front of
a fleet without Kubernetes.
"""

from __future__ import annotations

from typing import Any

from corral.picker.config import parse_endpoint
from corral.picker.extproc import DESTINATION

UPSTREAM_HEADER = "x-corral-upstream"


def _address(endpoint: str) -> dict[str, Any]:
    host, port = parse_endpoint(endpoint)
    return {"socket_address": {"address": host, "port_value": port}}


def _static_cluster(name: str, endpoints: list[str], **extra: Any) -> dict[str, Any]:
    return {"name": name, "type": "STATIC", "connect_timeout": "2s", **extra,
            "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [
                {"endpoint": {"address": _address(e)}} for e in endpoints]}]}}


def gateway_bootstrap(*, listen: str, admin: str, picker: str, pods: list[str],
                      fail_open: bool, retry_listen: str | None = None) -> dict[str, Any]:
    """The bootstrap (a dict to dump as YAML or JSON) for ``envoy -c``.

    ``retry_listen``: a second listener whose cluster holds the pods and balances with Envoy's
    ``override_host`` policy, which reads the picker's fallback list (``envoy.lb`` metadata) and
    on a retry (connection refused: a pod gone since the picker last saw it) takes the next
    endpoint of the list, where an ORIGINAL_DST cluster would retry the same dead address.
    """
    routes: list[dict[str, Any]] = [{
        "match": {"prefix": "/", "headers": [{"name": DESTINATION, "present_match": True}]},
        # timeout 0: a long generation is not cut; idle streams end by stream_idle_timeout.
        "route": {"cluster": "pool", "timeout": "0s"},
    }]
    clusters: list[dict[str, Any]] = [
        {"name": "pool", "type": "ORIGINAL_DST", "lb_policy": "CLUSTER_PROVIDED",
         "connect_timeout": "2s",
         "original_dst_lb_config": {"use_http_header": True, "http_header_name": DESTINATION}},
        _static_cluster("picker", [picker], typed_extension_protocol_options={
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/"
                         "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}}}}),
    ]
    # A pod gone since the picker last looked: the next attempt takes another pod.
    retry = {"retry_on": "connect-failure,refused-stream,reset-before-request",
             "num_retries": 2, "retry_host_predicate": [
                 {"name": "envoy.retry_host_predicates.previous_hosts", "typed_config": {
                     "@type": "type.googleapis.com/envoy.extensions.retry.host."
                              "previous_hosts.v3.PreviousHostsPredicate"}}],
             "host_selection_retry_max_attempts": 5}
    if fail_open:
        routes.append({"match": {"prefix": "/"}, "route": {
            "cluster": "pool_fallback", "timeout": "0s", "retry_policy": retry}})
        clusters.append(_static_cluster("pool_fallback", pods, lb_policy="ROUND_ROBIN"))
    listeners = [_listener("gateway", listen, _manager(routes, fail_open))]
    if retry_listen:
        listeners.append(_listener("gateway_retry", retry_listen, _manager(
            [{"match": {"prefix": "/"}, "route": {"cluster": "pool_hosts", "timeout": "0s",
                                                  "retry_policy": retry}}], fail_open)))
        clusters.append(_static_cluster("pool_hosts", pods, load_balancing_policy={
            "policies": [{"typed_extension_config": {
                "name": "envoy.load_balancing_policies.override_host", "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.load_balancing_policies."
                             "override_host.v3.OverrideHost",
                    "override_host_sources": [{"metadata": {
                        "key": "envoy.lb", "path": [{"key": DESTINATION}]}}],
                    "fallback_policy": {"policies": [{"typed_extension_config": {
                        "name": "envoy.load_balancing_policies.round_robin", "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions."
                                     "load_balancing_policies.round_robin.v3.RoundRobin"}}}]},
                }}}]}))
    return {
        "admin": {"address": _address(admin)},
        "static_resources": {"listeners": listeners, "clusters": clusters},
    }


def _listener(name: str, listen: str, manager: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "address": _address(listen), "filter_chains": [
        {"filters": [{"name": "envoy.filters.network.http_connection_manager",
                      "typed_config": manager}]}]}


def _manager(routes: list[dict[str, Any]], fail_open: bool) -> dict[str, Any]:
    return {
        "@type": "type.googleapis.com/envoy.extensions.filters.network."
                 "http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "gateway",
        "stream_idle_timeout": "300s",
        "route_config": {"name": "pool", "virtual_hosts": [
            {"name": "pool", "domains": ["*"], "routes": routes}],
            # Which pod answered: for the tests' and the bench's figures, and for debugging.
            "response_headers_to_add": [{"header": {"key": UPSTREAM_HEADER,
                                                    "value": "%UPSTREAM_HOST%"}}]},
        "http_filters": [
            {"name": "envoy.filters.http.ext_proc", "typed_config": {
                "@type": "type.googleapis.com/"
                         "envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor",
                "grpc_service": {"envoy_grpc": {"cluster_name": "picker"}, "timeout": "10s"},
                "failure_mode_allow": fail_open,
                # Per message, in STREAMED mode too: the header answer waits for the chunk
                # that names the model, so this bounds how long a client may trickle that.
                "message_timeout": "10s",
                # STREAMED (Envoy keeps each chunk until the picker answers it, so it can still
                # fail open when the picker is down) with the chunks sent before the header
                # answer: the picker needs the body's model to answer the headers.
                # FULL_DUPLEX_STREAMED hands the chunks over, and Envoy (1.40) then answers 500
                # instead of failing open once the first chunk has gone (Envoy PR #41276).
                "send_body_without_waiting_for_header_response": True,
                # Envoy takes the picker's fallback list (dynamic metadata) in this namespace.
                "metadata_options": {"receiving_namespaces": {"untyped": ["envoy.lb"]}},
                "processing_mode": {
                    "request_header_mode": "SEND", "response_header_mode": "SKIP",
                    "request_body_mode": "STREAMED", "response_body_mode": "NONE",
                    "request_trailer_mode": "SEND", "response_trailer_mode": "SKIP"}}},
            {"name": "envoy.filters.http.router", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}},
        ],
    }
