"""Real ``vllm serve`` processes for the server tests.

Modules that serve the default settings (``SINK_FLAGS`` with an API key; sessions on) share
one server for the whole session, which runs two API servers (``--api-server-count 2``, as a
deployment scales its HTTP front end; each request goes to either): a server takes about a minute to start on 2 cores, and
their tests measure what they check as differences of ``/metrics`` around their own
requests, or as invariants of the whole pool, so what ran before them does not count. A
module with ``SERVER_EXTRA_ARGS`` gets one of its own.
"""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from serverlib import API_KEY, SHARED_EXTRA_ARGS, Server  # noqa: E402


_running: list[Server] = []


@pytest.fixture(scope="session")
def shared_server(tmp_path_factory):
    srv = Server(SHARED_EXTRA_ARGS, tmp_path_factory.mktemp("shared") / "server.log", api_key=API_KEY)
    _running.append(srv)
    yield srv
    srv.stop()


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item, nextitem):
    """Stop the shared server after the last server test: the engine tests that run next
    need its memory. (After pytest's own teardown of the test's fixtures, which may still
    ask the server whether it is healthy.)"""
    here = Path(__file__).parent
    if _running and (nextitem is None or here not in nextitem.path.parents):
        _running.pop().stop()


@pytest.fixture(scope="module")
def server(request, tmp_path_factory):
    extra = getattr(request.module, "SERVER_EXTRA_ARGS", None)
    if extra is None:
        yield request.getfixturevalue("shared_server")
        return
    srv = Server(extra, tmp_path_factory.mktemp("server") / "server.log")
    yield srv
    srv.stop()
