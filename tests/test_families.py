"""The paper's model families (GPT-NeoX/Pythia, Falcon) and today's (Qwen3, Llama 3 rope
scaling, Gemma, Phi-2, GPT-J): each served exactly with the sink policy, or refused.

Models are tiny and random (``tests/family_models.py``: 2 layers, the real SmolLM2 tokenizer
and vocabulary, built locally), the text is real (Hamlet). Two checks per family:

* the family's plain-PyTorch reference (``tests/reference_families.py``), dense, equals
  transformers' own forward of the same files (float32, within 1e-4 nats per token;
  measured max 3.5e-5, Gemma): the reference is that family;
* the plugin's engine (float32, B=16, W=128, 64-token chunks, the model shrunk to 512
  rotary positions so the stream crosses epochs) over 1,000 prompt tokens of real text
  (about 54 pages evicted) and 16 generated ones equals that reference streaming with the
  sink policy, within the float32 tolerance of ``tests/tolerances.py`` (max 1e-3, mean
  1e-4, after eviction within 5x the error before it); measured max 8.0e-5 (Gemma), means
  1.0e-6 to 9.1e-6. A wrong visible set, position or rotation is far outside it: the
  dense reading of the same stream is 0.38 to 1.47 nats a token away.

Half the families keep the sink as one whole page (16 tokens), half as the paper's 4 tokens
(a partial sink page). ALiBi families (MPT, BLOOM) are refused at start-up. One engine at a
time (the session's ``engines`` cache); about a minute in all on two CPU cores once vLLM's
sampler is compiled (the first engine of a process compiles it: ~20 s more).
"""

import os

import pytest
import torch

import family_models
from engine_helpers import run_scored
from reference import chunked_steps, contract_w0
from reference_families import reference_for
from tolerances import F32_MAX_MEAN, check

FAMILIES = list(family_models.FAMILIES)
N_PROMPT, N_GEN, CHUNK, B, W = 1000, 16, 64, 16, 128
# Sink per family: whole page (sink_pages=1) or the paper's 4 tokens (partial page).
SINK = {name: (dict(sink_pages=1), 16) if i % 2 == 0 else (dict(sink_tokens=4), 4) for i, name in enumerate(FAMILIES)}


@pytest.fixture(scope="module")
def text(hamlet_ids):
    return hamlet_ids[:N_PROMPT]


@pytest.mark.parametrize("family", FAMILIES)
def test_reference_is_the_family(family, text):
    """Dense, the reference computes what transformers computes for the family (the
    reference runs in 64-token steps through its cache; transformers in one pass)."""
    from transformers import AutoModelForCausalLM

    path = family_models.model_dir(family)
    ids = text[:300]
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
    hf = logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    ref = reference_for(path).stream_logprobs(ids, chunked_steps(len(ids), CHUNK, len(ids)),
                                              sink_tokens=0, window=None, block_size=B)
    diff = (hf - ref).abs()
    print(f"\n{family}: dense reference vs transformers, {len(diff)} tokens: max {diff.max().item():.3g}, mean {diff.mean().item():.3g}")
    assert diff.max().item() < 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_plugin_matches_family_reference(family, engines, text):
    from vllm_sink.invariants import ROW_LOG
    from vllm_sink.metrics import SINK_STATS

    sink, S = SINK[family]
    path = family_models.model_dir(family)
    llm = engines.get(f"family:{family}", path, block_size=B, max_num_batched_tokens=CHUNK, max_num_seqs=4,
                      kv_cache_memory_bytes=64 << 20, kv_policy="sink", kv_window=W, max_stream_len=4096, **sink)
    epochs0, evicted0 = SINK_STATS.epochs, SINK_STATS.pages_evicted
    ROW_LOG.clear()
    prompt_lp, gen, gen_lp, _ = run_scored(llm, text, N_GEN)
    plugin = torch.tensor(prompt_lp + gen_lp, dtype=torch.float64)
    tokens = list(text) + gen
    steps = chunked_steps(len(text), CHUNK, len(tokens))
    reference = reference_for(path)
    ref = reference.stream_logprobs(tokens, steps, sink_tokens=S, window=W, block_size=B)
    dense = reference.stream_logprobs(tokens, steps, sink_tokens=0, window=None, block_size=B)
    diff = (plugin - ref).abs()
    first_evicted = next(a for a, b in steps if contract_w0(a, S, W, B) > S)
    report = dict(
        tokens=len(diff), max=diff.max().item(), mean=diff.mean().item(),
        control_mean=diff[:first_evicted].mean().item(), evicting_mean=diff[first_evicted:].mean().item(),
        dense_mean=(plugin - dense).abs()[first_evicted:].mean().item(),
        epochs=SINK_STATS.epochs - epochs0, pages_evicted=SINK_STATS.pages_evicted - evicted0,
    )
    print(f"\n{family} S={S} W={W}: {report}")
    assert report["pages_evicted"] >= (len(text) - W - S) // B - 2, "pages were not evicted"
    assert report["epochs"] >= 1, "the stream crossed no epoch"
    assert not check(report, "float32"), (check(report, "float32"), report)
    assert report["dense_mean"] > 100 * F32_MAX_MEAN, report
    if os.environ.get("VLLMSINK_CHECK_ROWS") == "1":
        compared, bad = ROW_LOG.mismatches()
        ROW_LOG.clear()
        assert compared and not bad, f"{len(bad)} of {compared} rows differ: {bad[:3]}"


@pytest.mark.parametrize("family", list(family_models.ALIBI_FAMILIES))
def test_alibi_families_refused(family):
    """MPT and BLOOM position by ALiBi (a bias on key distance), not by rotating keys: the
    sink policy refuses them at start-up, before any weight is loaded."""
    from vllm_sink import LLM
    from vllm_sink.config import SinkConfigError

    with pytest.raises(SinkConfigError, match="uses ALiBi positions, not RoPE"):
        LLM(str(family_models.model_dir(family)), dtype="float32", enforce_eager=True,
            kv_policy="sink", kv_window=W, block_size=B)


def _model_config(**hf):
    """The fields of vLLM's ModelConfig that ``refusals.check_model`` reads."""
    from types import SimpleNamespace

    flags = dict.fromkeys(("is_encoder_decoder", "use_mla", "is_hybrid", "is_attention_free", "uses_mrope",
                           "uses_alibi", "is_multimodal_model"), False)
    return SimpleNamespace(model="m", runner_type="generate", hf_text_config=SimpleNamespace(**hf),
                           get_sliding_window=lambda: None, **flags)


def test_gptj_rotary_dim_counts_as_rope():
    """GPT-J's config names its RoPE only by ``rotary_dim`` (no rope_theta, no
    rope_parameters): accepted (the worker then checks the RotaryEmbedding vLLM built,
    GPT-J style), while a config with no rotary field at all (GPT-2) is still refused."""
    from vllm_sink.config import SinkConfigError
    from vllm_sink.patches.refusals import check_model

    check_model(_model_config(model_type="gptj", rotary_dim=64, max_position_embeddings=2048))
    with pytest.raises(SinkConfigError, match="no rotary position embeddings"):
        check_model(_model_config(model_type="gpt2", max_position_embeddings=1024))
