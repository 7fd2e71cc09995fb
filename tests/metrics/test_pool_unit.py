"""The pool metrics' arithmetic, from ``/slots`` lists shaped as llama-server sends them, and
the ``node`` addresses of ``/admin/status``; the real child is in test_pool_protocol.py."""

from __future__ import annotations

from corral import __version__
from corral.config import parse_config
from corral.metrics.pool import kv_cache_utilization
from corral.proxy.admin import node


def slot(n_ctx: int, busy: bool, prompt: int = 0, decoded: int = 0) -> dict[str, object]:
    return {"id": 0, "n_ctx": n_ctx, "is_processing": busy, "n_prompt_tokens": prompt,
            "next_token": [{"has_next_token": busy, "n_remain": -1, "n_decoded": decoded}]}


def test_busy_slots_count_prompt_and_generated_tokens_over_every_slot() -> None:
    child_a = [slot(512, True, prompt=100, decoded=28), slot(512, False, prompt=300)]
    child_b = [slot(1024, True, prompt=1000, decoded=100)]  # over its share: counted as full
    assert kv_cache_utilization([child_a, child_b]) == (128 + 0 + 1024) / 2048


def test_no_serving_child_and_odd_fields_read_as_zero() -> None:
    assert kv_cache_utilization([]) == 0.0
    odd = [{"n_ctx": "512", "is_processing": True}, {"n_ctx": 256, "is_processing": True,
                                                     "n_prompt_tokens": True, "next_token": {}}]
    assert kv_cache_utilization([odd]) == 0.0


def test_node_lists_every_address_with_the_port() -> None:
    config = parse_config({"listen": {"host": ["127.0.0.1", "::1"], "port": 8080},
                           "models": {}})
    assert node(config) == {"version": __version__, "listen": ["127.0.0.1:8080", "[::1]:8080"]}
