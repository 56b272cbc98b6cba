"""The plugin loads in vLLM's Ray workers: an engine with ``distributed_executor_backend=
"ray"`` and tensor parallelism 2, configured only through stock ``additional_config`` in a
script that never imports vllm_sink, applies the policy in both Ray worker actors.

The script streams 640 tokens of Hamlet (prompt logprobs, 64-token chunks) through the
"sink16_p512" settings (W=256, 512 rotary positions: pages are evicted and epochs happen)
and its per-token prompt logprobs must equal those of the in-process "sink16_p512" engine
(TP=1, the original model). It also checks that eviction really happened (the engine core's
``pages_evicted``) and that each of the two Ray workers ran the policy (its own counters,
published from its own process: sink re-anchorings and epochs).

What it takes to run this on the CPU (the script does each step):

* **vLLM's CPU build does not run the Ray executor at all, TP=1 included**: its platform
  has no Ray device key (``CpuPlatform.ray_device_key == ""``), and both Ray executors stop
  at ``initialize_ray_cluster`` with ``ValueError: current platform cpu does not support
  ray.`` The script starts Ray itself (``ray.init(num_cpus=2, num_gpus=2,
  include_dashboard=False)``: the two "GPUs" are only Ray resource labels, one per worker)
  and sets ``CpuPlatform.ray_device_key = "GPU"`` in its own process and, through Ray's
  ``worker_process_setup_hook``, in every Ray worker process. That is the whole shim: it
  touches neither vllm_sink nor how vLLM loads plugins; the workers load vllm_sink through
  the ``vllm.general_plugins`` entry point by themselves, as on a GPU. vLLM 0.26 then
  runs its default Ray executor (``RayExecutorV2``: workers are Ray actors fed through
  vLLM's shared-memory message queues; no Ray compiled graph, no cupy). The engine core runs
  in the script's process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), where the shim is.
* **TP=2 needs the head-padded model**: SmolLM2-135M's 9 query / 3 KV heads do not split
  over 2 ranks (vLLM refuses: 9 heads not divisible by tensor_parallel_size 2). The script
  runs the copy made by ``padded_model.pad_heads`` (12 / 4 heads, the new heads zero:
  the same function, see tests/test_padded_model.py).
* **Tolerance**: the logprobs differ from TP=1's only by float32 rounding, but TP=2 sums
  each layer's output in two halves (and the padded matrices have other shapes), so the
  per-token difference is ~1e-6 on average with a max of ~1-2e-5 (measured here: mean
  1.7e-6, max 1.3e-5 over 639 tokens; the padded model alone, TP=1 in-process, already
  differs from the original by max 1.9e-5). The test holds the mean to
  tests/test_engine_multiprocess.py's tolerance (1e-5) and the max to 1e-4. Vanilla vLLM is
  ~0.25 nats/token away once pages are evicted, four orders of magnitude above either bound;
  and with the plugin kept out of the Ray workers only (``VLLM_PLUGINS`` set to another
  name in their ``runtime_env``) the engine does not even start: the workers report vLLM's
  plain full-attention KV spec, whose 16384-token stream cap does not fit the 256 MiB pool.

Teardown: the script shuts the engine (and so its Ray actors) down, then Ray itself, prints
its result and leaves with ``os._exit(0)`` (vLLM's teardown at interpreter exit can abort
after the engine is already shut down, see tests/test_engine_multiprocess.py).
"""

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

from engine_helpers import COMMON, ENGINES, run_scored, shm_listing, sweep_cpu_shm

ENGINE = "sink16_p512"
N = 640
TP = 2
SCRIPT = textwrap.dedent(
    """
    import glob, json, os, sys, time


    def ray_capable_cpu():
        # vLLM's CPU platform names no Ray device; let the Ray executor place one worker per
        # (label-only) "GPU" resource. Runs in this process and, as Ray's
        # worker_process_setup_hook, in every Ray worker before vLLM's actor code.
        from vllm.platforms.cpu import CpuPlatform

        CpuPlatform.ray_device_key = "GPU"


    if __name__ == "__main__":
        model, kwargs, ids_path, tp = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], int(sys.argv[4])
        import ray

        assert "vllm_sink" not in sys.modules
        ray.init(num_cpus=2, num_gpus=tp, include_dashboard=False,
                 runtime_env={"worker_process_setup_hook": ray_capable_cpu,
                              "env_vars": {"OMP_NUM_THREADS": str(max(1, 2 // tp))}})
        ray_capable_cpu()
        from vllm import LLM, SamplingParams

        t0 = time.time()
        llm = LLM(model, tensor_parallel_size=tp, distributed_executor_backend="ray", **kwargs)
        startup = time.time() - t0
        executor = type(llm.llm_engine.engine_core.engine_core.model_executor).__name__
        ids = json.load(open(ids_path))
        t0 = time.time()
        out = llm.generate([{"prompt_token_ids": ids}],
                           SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0),
                           use_tqdm=False)[0]
        run = time.time() - t0
        lps = [next(iter(d.values())).logprob for d in out.prompt_logprobs[1:]]
        # Workers publish their counters at most every 0.25 s, and at once on the step that
        # tells them a request finished: one more request brings that step, so the
        # snapshots read below hold the whole stream whatever the timing.
        llm.generate([{"prompt_token_ids": ids[:8]}], SamplingParams(max_tokens=1), use_tqdm=False)
        # The engine core runs here: its counters are this process's. Each worker publishes
        # its own into the directory the plugin named in VLLMSINK_METRICS_DIR (handed to the
        # Ray workers with the driver's environment by vLLM's Ray executor).
        from vllm_sink.metrics import METRICS_DIR_ENV, SINK_STATS

        evicted, epochs_engine = SINK_STATS.pages_evicted, SINK_STATS.epochs
        llm.llm_engine.engine_core.shutdown()  # stops the Ray worker actors
        workers = {}
        for path in glob.glob(os.path.join(os.environ[METRICS_DIR_ENV], "worker-*.json")):
            workers[path.rsplit("-", 1)[1].split(".")[0]] = json.load(open(path))
        ray.shutdown()
        print("RESULT " + json.dumps(dict(lps=lps, pages_evicted=evicted, executor=executor,
                                          driver_pid=os.getpid(), workers=workers,
                                          startup_s=startup, run_s=run)), flush=True)
        os._exit(0)
    """
)


def _script_kwargs(name: str) -> dict:
    """The engine's settings with the sink ones moved into stock ``additional_config``."""
    from vllm_sink.config import USER_KEYS

    kw = dict(COMMON, **ENGINES[name])
    sink = {k: kw.pop(k) for k in list(kw) if k in USER_KEYS}
    kw["additional_config"] = sink
    return kw


@pytest.mark.engine(ENGINE)
def test_policy_active_in_ray_workers(llm, tmp_path, hamlet_ids):
    pytest.importorskip("ray")
    from padded_model import pad_heads

    from vllm_sink import assets

    padded = pad_heads(assets.model_dir(), tmp_path / "padded")
    ids = hamlet_ids[:N]
    (tmp_path / "ids.json").write_text(json.dumps(ids))
    (tmp_path / "run.py").write_text(SCRIPT)
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", PYTHONUNBUFFERED="1")
    # The in-process engine set this process's metrics directory; the script's engine makes
    # its own, but a Ray worker keeps the value it inherits from the raylet (vLLM hands it
    # the driver's environment with setdefault), so start Ray without a stale one.
    env.pop("VLLMSINK_METRICS_DIR", None)
    sweep_cpu_shm()  # a stale all-reduce segment of an earlier run would stop this one
    before = shm_listing()
    t0 = time.time()
    try:
        proc = subprocess.run(
            [sys.executable, str(tmp_path / "run.py"), str(padded), json.dumps(_script_kwargs(ENGINE)),
             str(tmp_path / "ids.json"), str(TP)],
            env=env, capture_output=True, text=True, timeout=900,
        )
    finally:
        sweep_cpu_shm(before)  # the script leaves with os._exit: vLLM's segments stay behind
    wall = time.time() - t0
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, (proc.stdout[-2000:] + proc.stderr[-4000:])
    res = json.loads(lines[0][len("RESULT "):])
    assert res["executor"] == "RayExecutorV2"

    in_process, _, _, _ = run_scored(llm, ids, 1)
    assert len(res["lps"]) == len(in_process) == N - 1
    diff = [abs(a - b) for a, b in zip(res["lps"], in_process)]
    mean, worst = sum(diff) / len(diff), max(diff)

    # Eviction happened (engine core), and both Ray workers ran the policy in their own
    # processes: sink keys re-anchored after evictions, epochs at 512 positions.
    assert res["pages_evicted"] > 0
    workers = {pid: snap for pid, snap in res["workers"].items() if int(pid) != res["driver_pid"]}
    assert len(workers) == TP, res["workers"]
    for snap in workers.values():
        assert snap["sink_rotations"] > 0 and snap["epochs"] > 0, snap
    print(f"\nRay TP={TP} (padded 12/4 heads) vs in-process TP=1: {N - 1} tokens, |dlogprob| mean "
          f"{mean:.2e} max {worst:.2e}; pages evicted {res['pages_evicted']}; workers {workers}; "
          f"script {wall:.0f} s (engine start {res['startup_s']:.0f} s, stream {res['run_s']:.0f} s)")
    assert mean < 1e-5 and worst < 1e-4, (mean, worst)
