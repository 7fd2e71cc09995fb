"""``corral ps``: what a running corral serves, as a table (like ``ollama ps``, with slots)."""

from __future__ import annotations

from typing import Any

import httpx

from corral.errors import StatusError as StatusError  # defined with every error

COLUMNS = ("MODEL", "STATE", "SLOTS", "QUEUE", "CTX/SLOT", "IN FLIGHT", "PID", "UPTIME",
           "MEMORY")


def fetch_status(url: str, api_key: str | None = None, timeout: float = 5.0) -> dict[str, Any]:
    """The ``/admin/status`` of the corral at ``url``, presenting ``api_key`` if given.

    Raises ``StatusError`` when corral cannot be reached, refuses the key, or answers with
    something that is not its status.
    """
    endpoint = url.rstrip("/") + "/admin/status"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        response = httpx.get(endpoint, headers=headers, timeout=timeout)
    except httpx.ConnectError as exc:
        raise StatusError(f"cannot read {endpoint}: cannot connect ({exc}); is corral running "
                          "and listening there?") from None
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        raise StatusError(f"cannot read {endpoint}: {exc}") from None
    if response.status_code == 401:
        why = ("corral refused the API key; check --key or CORRAL_API_KEY" if api_key else
               "corral requires an API key with the status (or admin) scope; pass --key or set "
               "CORRAL_API_KEY")
        raise StatusError(f"cannot read {endpoint}: {why} ({_answer(response)})")
    if response.status_code == 403:
        raise StatusError(f"cannot read {endpoint}: the API key has neither the status nor the "
                          f"admin scope ({_answer(response)})")
    if response.status_code != 200:
        raise StatusError(f"cannot read {endpoint}: {_answer(response)}")
    try:
        body = response.json()
    except ValueError:
        body = None
    if not isinstance(body, dict) or ("models" not in body and "pods" not in body):
        raise StatusError(f"cannot read {endpoint}: the answer is not corral's status; is "
                          "corral listening there?")
    return body


def _answer(response: httpx.Response) -> str:
    """The status line and corral's own error message (which never holds a key), if any."""
    answer = f"{response.status_code} {response.reason_phrase}"
    try:
        message = response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return answer
    return f"{answer}: {message}"


_BROKEN = ("failed", "crashed", "given_up")


def render(status: dict[str, Any]) -> str:
    """The status as an aligned text table, one row per model, then the totals."""
    if "models" not in status:
        raise StatusError("the answer is the endpoint picker's status: use corral ps --fleet")
    rows = [COLUMNS]
    for m in status["models"]:
        usage = m.get("memory") or {}
        memory = sum(usage.get("actual", {}).values()) or usage.get("rss") or 0
        rows.append((
            m["name"],
            _state(m),
            f"{m['slots_busy']}/{m['slots']}",
            f"{m['queue_depth']}/{m['queue_limit']}",
            str(m["ctx_per_slot"]),
            str(m["in_flight"]),
            str(m["pid"] or "-"),
            _duration(m["uptime_seconds"]),
            _size(memory) if memory else "-",
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
             for row in rows]
    t = status["totals"]
    lines.append(f"\n{t['models_ready']}/{t['models']} models ready, "
                 f"{t['slots_busy']}/{t['slots']} slots busy, {t['queue_depth']} queued")
    for d in status.get("devices", ()):
        lines.append(f"{d['device']}: {_size(d['reserved'])} reserved of "
                     f"{_size(d['capacity'])}, {_size(d['free'])} free")
    return "\n".join(lines)


FLEET_COLUMNS = ("POD", "MODEL", "STATE", "SLOTS FREE", "QUEUE", "FITS", "SENT")


def render_fleet(status: dict[str, Any]) -> str:
    """The picker's fleet (its ``/admin/status``): one row per model of every pod, then totals.

    SLOTS FREE is free/total, QUEUE depth/limit; FITS says whether a model not loaded would
    load there now (``now``), after evicting idle models (``evict``) or not (``no``); SENT is
    what the picker sent the pod since its last view of it.
    """
    if "pods" not in status:
        raise StatusError("the answer is a corral's status, not a picker's: use corral ps "
                          "--url for one corral, --fleet for the picker")
    rows = [FLEET_COLUMNS]
    for pod in status["pods"]:
        if not pod["up"]:
            rows.append((pod["endpoint"], "-", f"down: {(pod.get('error') or '')[:40]}",
                         "-", "-", "-", str(pod.get("in_flight_sent", 0))))
            continue
        if not pod["models"]:
            rows.append((pod["endpoint"], "-", "no models", "-", "-", "-", "-"))
        for i, m in enumerate(pod["models"]):
            fit = m.get("fit")
            fits = "-" if fit is None else (
                "now" if fit["now"] else "evict" if fit["after_evicting_idle"] else "no")
            rows.append((
                pod["endpoint"] if i == 0 else "",
                m["name"],
                m["state"] + (" (draining)" if pod.get("draining") and i == 0 else ""),
                f"{m['slots_free']}/{m['slots']}",
                f"{m['queue_depth']}/{m['queue_limit']}",
                fits,
                str(pod.get("in_flight_sent", 0)) if i == 0 else "",
            ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(FLEET_COLUMNS))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
             for row in rows]
    t = status["totals"]
    lines.append(f"\n{t['pods_up']}/{t['pods']} pods up, {t['slots_free']}/{t['slots']} slots "
                 f"free, {t['queue_depth']} queued")
    decided = {r: n for r, n in (status.get("decisions") or {}).items() if n}
    if decided:
        lines.append("decisions: " + ", ".join(f"{r} {n}" for r, n in sorted(decided.items())))
    return "\n".join(lines)


def _state(m: dict[str, Any]) -> str:
    """``ready``, ``downloading 43%``, ``failed: REASON``."""
    download = m.get("download") or {}
    if m["state"] == "downloading" and download.get("bytes_total"):
        return f"{download['phase']} {download['percent']}%"
    if m.get("last_error") and m["state"] in _BROKEN:
        return f"{m['state']}: {m['last_error'][:40]}"
    return str(m["state"])


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
