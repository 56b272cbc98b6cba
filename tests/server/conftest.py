"""One real ``vllm serve`` per test module (``SERVER_EXTRA_ARGS`` adds flags)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from serverlib import Server  # noqa: E402


@pytest.fixture(scope="module")
def server(request, tmp_path_factory):
    extra = getattr(request.module, "SERVER_EXTRA_ARGS", [])
    api_key = getattr(request.module, "SERVER_API_KEY", None)
    srv = Server(extra, tmp_path_factory.mktemp("server") / "server.log", api_key=api_key)
    yield srv
    srv.stop()
