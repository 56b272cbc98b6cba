"""A real ``vllm serve`` (the stock executable, multiprocess) on localhost."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

# benchmarks/workers.py: the health wait and /metrics parsing, shared with benchmarks/serve.py.
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from workers import prometheus_values, wait_healthy  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine_helpers import PAGE, chunked  # noqa: E402  (pages: 16 tokens on vLLM 0.26.0, 32 on 0.32.0)

VENV_BIN = Path(sys.executable).parent
MODEL_NAME = "smol"
API_KEY = "vllm-sink-test-key"  # stock --api-key keeps working beside the plugin's flags

# The policy as a user would serve SmolLM2 on the CPU, with the model shrunk to 512
# positions so that streams go 10x past them quickly: each sequence computes at most 32
# tokens a step and the step budget (512) fits 16 of them, so a stream's schedule does not
# depend on what else runs.
SINK_FLAGS = ["--kv-policy", "sink", "--sink-pages", "1", "--kv-window", "256", "--max-stream-len", "8192"]
# The same settings through stock --additional-config, without a stream cap (the default).
SINK_ADDITIONAL_CONFIG = ["--additional-config", '{"kv_policy": "sink", "sink_pages": 1, "kv_window": 256}']
# The shared server's front end: two API server processes (each applies the policy's limits
# and serves the vllm_sink: series), and each reply's cached prompt tokens in its usage.
API_SERVERS = 2
SHARED_EXTRA_ARGS = ["--api-server-count", str(API_SERVERS), "--enable-prompt-tokens-details"]
BASE_ARGS = [
    "--dtype", "float32", "--enforce-eager", "--block-size", str(PAGE),
    "--max-num-seqs", "16", *(f"--{k.replace('_', '-')}={v}" for k, v in chunked(32).items()),
    "--max-model-len", "512", "--hf-overrides", '{"max_position_embeddings": 512}',
    "--served-model-name", MODEL_NAME, "--disable-uvicorn-access-log",
    "--kv-cache-memory-bytes", str(256 << 20),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, extra_args: list[str], log_path: Path, sink_args: list[str] = SINK_FLAGS, api_key: str | None = None):
        from vllm_sink import assets

        self.api_key = api_key
        self.args = list(extra_args)
        auth = ["--api-key", api_key] if api_key else []
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        env = dict(os.environ)
        env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # the stock multiprocess server
        env.pop("VLLMSINK_CHECK_ROWS", None)  # needs manager and worker in one process
        self.proc = subprocess.Popen(
            [str(VENV_BIN / "vllm"), "serve", str(assets.model_dir()), "--host", "127.0.0.1",
             "--port", str(self.port), *BASE_ARGS, *sink_args, *auth, *extra_args],
            stdout=open(log_path, "w"), stderr=subprocess.STDOUT, env=env,
        )
        wait_healthy(self.proc, self.url, log_path, timeout=600)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def healthy(self) -> bool:
        import requests

        return self.proc.poll() is None and requests.get(self.url + "/health", timeout=5).status_code == 200

    def metrics(self) -> dict[str, float]:
        """``name{labels} value`` lines of /metrics, summed over label sets per name. With
        several API servers, the ``vllm_sink:`` series reach /metrics through a copy made
        every 0.1 s: a scrape first waits that long twice, so that it sees what the engine
        published before the last reply."""
        import requests

        if "--api-server-count" in self.args:
            time.sleep(0.25)

        return prometheus_values(requests.get(self.url + "/metrics", timeout=10).text)

    def wait_idle(self, timeout: float = 120) -> dict[str, float]:
        """Wait until no sequence holds pages; return the metrics then."""
        start = time.time()
        while True:
            m = self.metrics()
            # (vLLM publishes num_requests_running with its first step's stats: none yet, none ran)
            if m.get("vllm_sink:running_kv_pages", 1) == 0 and m.get("vllm:num_requests_running", 0) == 0:
                return m
            if time.time() - start > timeout:
                raise TimeoutError(f"server still busy: {m}")
            time.sleep(1)

    @staticmethod
    def free_or_kept(m: dict[str, float]) -> float:
        """Pages no running request holds (free, or kept for a session's next turn)."""
        return m["vllm_sink:free_kv_pages"] + m.get("vllm_sink:kept_session_pages", 0)

    def client(self, **kwargs):
        import openai

        return openai.OpenAI(base_url=self.url + "/v1", api_key=self.api_key or "none", max_retries=0, **kwargs)

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


