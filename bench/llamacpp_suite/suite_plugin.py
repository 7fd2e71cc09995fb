"""A pytest plugin for llama.cpp's server tests run offline (``-p suite_plugin``).

The tests import ``wget`` and ``filelock`` (for downloads) and start every preset once per
session to download its model (``ServerPreset.load_all``). Nothing is downloaded here: the
stand-ins map models to local files, so both imports get stand-ins and ``load_all`` does
nothing. A preset whose model is not mapped fails in its own tests, against both servers.

With ``CORRAL_SUITE_ANY_HEADER_CASE=1`` the tests look response headers up whatever their case
(they copy them into a plain dict and look them up in llama-server's spelling; corral's HTTP
server writes header names in lower case): what is left is what differs beyond the spelling.
"""

from __future__ import annotations

import os
import sys
import types
from contextlib import nullcontext
from typing import Any


def _stub(name: str, **attributes: Any) -> None:
    if name in sys.modules:
        return
    try:
        __import__(name)
    except ImportError:
        module = types.ModuleType(name)
        module.__dict__.update(attributes)
        sys.modules[name] = module


def _no_download(*args: object, **kwargs: object) -> str:
    raise RuntimeError("nothing is downloaded in this run")


_stub("wget", download=_no_download)
_stub("filelock", FileLock=lambda path, *a, **k: nullcontext())


def pytest_collection_modifyitems(session: Any, config: Any, items: list[Any]) -> None:
    """After the tests' conftest imported ``utils``: no downloads at session start."""
    utils = sys.modules.get("utils")
    if utils is None:
        return
    utils.ServerPreset.load_all = staticmethod(lambda: None)
    if os.environ.get("CORRAL_SUITE_ANY_HEADER_CASE") == "1":
        from requests.structures import CaseInsensitiveDict

        asked = utils.ServerProcess.make_request

        def make_request(self: Any, *args: Any, **kwargs: Any) -> Any:
            response = asked(self, *args, **kwargs)
            response.headers = CaseInsensitiveDict(response.headers)
            return response

        utils.ServerProcess.make_request = make_request
