"""The plugin loads in every vLLM process: a default (multiprocess) engine, configured only
through stock ``additional_config`` in a script that never imports vllm_sink, applies the
policy in its spawned engine-core and worker processes.

The script's prompt log-probabilities must equal those of the in-process "sink16" engine;
vanilla vLLM (no policy in the worker) is ~0.25 nats/token away once pages are evicted.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from engine_helpers import run_scored

N = 1000
SCRIPT = textwrap.dedent(
    """
    import json, sys
    from vllm import LLM, SamplingParams

    if __name__ == "__main__":
        model, n = sys.argv[1], int(sys.argv[2])
        assert "vllm_sink" not in sys.modules
        llm = LLM(model, dtype="float32", enforce_eager=True, block_size=16, max_num_seqs=4,
                  max_num_batched_tokens=512, long_prefill_token_threshold=64,
                  kv_cache_memory_bytes=256 << 20,
                  additional_config={"kv_policy": "sink", "sink_pages": 1, "kv_window": 256,
                                     "max_stream_len": 16384})
        tok = llm.get_tokenizer()
        from pathlib import Path
        ids = json.loads(Path(sys.argv[3]).read_text())
        out = llm.generate([{"prompt_token_ids": ids}],
                           SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0),
                           use_tqdm=False)[0]
        lps = [next(iter(d.values())).logprob for d in out.prompt_logprobs[1:]]
        def arenas(worker):
            import os
            import vllm_sink.allocator as allocator
            return [os.getpid(), os.environ.get("MALLOC_ARENA_MAX"), allocator.last, allocator.heaps()]
        arenas = llm.collective_rpc(arenas)
        import os
        arenas = [a for a in arenas if a[0] != os.getpid()]
        llm.llm_engine.engine_core.shutdown()
        print("RESULT " + json.dumps(lps), flush=True)
        print("ARENAS " + json.dumps(arenas), flush=True)
        # vLLM's multiprocess teardown at interpreter exit can abort ("terminate called
        # without an active exception") after the engine is already shut down; the result
        # is in hand, so leave without running it.
        import os
        os._exit(0)
    """
)


@pytest.mark.engine("sink16")
def test_policy_active_in_spawned_processes(llm, tmp_path, hamlet_ids):
    from vllm_sink import assets

    ids = hamlet_ids[:N]
    (tmp_path / "ids.json").write_text(json.dumps(ids))
    (tmp_path / "run.py").write_text(SCRIPT)
    # (Insecure serialisation: the script sends a function to the worker to read its
    # environment, through collective_rpc.)
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="1", VLLM_ALLOW_INSECURE_SERIALIZATION="1")
    env.pop("MALLOC_ARENA_MAX", None)
    proc = subprocess.run(
        [sys.executable, str(tmp_path / "run.py"), str(assets.model_dir()), str(N), str(tmp_path / "ids.json")],
        env=env, capture_output=True, text=True, timeout=900,
    )
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    spawned = json.loads(lines[0][len("RESULT "):])
    in_process, _, _, _ = run_scored(llm, ids, 1)
    assert len(spawned) == len(in_process) == N - 1
    assert max(abs(a - b) for a, b in zip(spawned, in_process)) < 1e-5
    # The engine core (whose process runs the worker here) inherited the arena limit that
    # the plugin exported in the script's process before vLLM started it
    # (vllm_sink.allocator); the script's environment had none. It has one malloc heap
    # after a thousand-token prompt, whatever its threads.
    arenas = json.loads([l for l in proc.stdout.splitlines() if l.startswith("ARENAS ")][0][len("ARENAS "):])
    assert arenas and all(a[1:] == ["1", ["1", False], 1] for a in arenas), arenas
