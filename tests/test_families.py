"""The paper's model families (GPT-NeoX/Pythia, Falcon, MPT and BLOOM with ALiBi),
today's (Qwen3, Qwen2 with its q/k/v biases, Mistral without its sliding window, Llama 3
rope scaling, Gemma, Phi-2, GPT-J) and mixtures of experts with ordinary attention (Mixtral,
Qwen3-MoE, Qwen2-MoE with its gated shared expert, OLMoE with its q/k norms): each served
exactly with the sink policy, or refused.

Models are tiny and random (``tests/family_models.py``: 2 layers, the real SmolLM2 tokenizer
and vocabulary, built locally; the mixtures have 4 experts, 2 per token), the text is real
(Hamlet). Two checks per family:

* the family's plain-PyTorch reference (``tests/reference_families.py``), dense, equals
  transformers' own forward of the same files (float32, within 1e-4 nats per token;
  measured max 5.8e-5, Qwen2-MoE): the reference is that family (Qwen2's without its random
  q/k/v biases is 0.79 nats a token away, 5.1 at most; a mixture's without its top-k
  renormalisation 0.17 (Qwen3-MoE) and 0.23 (Mixtral), Qwen2-MoE's without its shared
  expert 1.3, OLMoE's with per-head instead of whole-projection q/k norms 0.39);
* the plugin's engine (float32, B=16 (32 on vLLM 0.32.0, whose CPU attention needs it),
  W=128, 64-token chunks, the model shrunk to 512 rotary positions so the stream crosses
  epochs) over 1,000 prompt tokens of real text (about 54 pages evicted) and 16 generated
  ones equals that reference streaming with the sink policy, within the float32 tolerance
  of ``tests/tolerances.py`` (max 1e-3, mean 1e-4, after eviction within 5x the error
  before it); measured max 8.9e-5 (Mistral; 7.4e-5 the largest of the mixtures,
  Qwen2-MoE), means 1.0e-6 to 9.1e-6. A wrong visible set, position or rotation is far
  outside it: the dense reading of the same stream is 0.38 to 1.60 nats a token away.

Half the families keep the sink as one whole page (16 tokens), half as the paper's 4 tokens
(a partial sink page).

ALiBi families (MPT, BLOOM; 6 heads, MPT with clip_qkv): nothing rotates, the kernel biases
each key by its index in the compacted row, i.e. the contract's cache positions. Each is
served with a whole sink page and with a 4-token sink, matched against the reference with
ALiBi at cache positions (same float32 tolerance, no epoch; measured max 9.7e-6, means
1.7e-6 to 1.9e-6), and shown to be far from the reference with ALiBi at the tokens' absolute
positions (the negative check: 0.04 to 0.11 nats a token after eviction). vLLM's BLOOM
computes the exact GELU where transformers' computes the tanh approximation: the reference
follows transformers for the dense check and vLLM (``gelu="exact"``) for the engine; the
tanh reading is about 2.8e-4 nats a token from the engine on average, above the 1e-4
tolerance, so the difference would show. Models with neither RoPE nor ALiBi (GPT-2) are
refused, and so are ALiBi models on GPU backends whose ALiBi is not known to be index-based
(FLASH_ATTN).

One engine at a time (the session's ``engines`` cache); about three minutes in all on two
CPU cores once vLLM's sampler is compiled (the first engine of a process compiles it: ~20 s
more). A mixture costs what a dense family does (about 4 s: its engine starts as fast, vLLM's
CPU fused-MoE kernel needs no warm-up at this size).
"""

import os

import pytest
import torch

import family_models
from engine_helpers import PAGE, run_scored
from reference import chunked_steps, contract_w0
from reference_families import reference_for
from tolerances import F32_MAX_MEAN, check

FAMILIES = list(family_models.FAMILIES)
ALIBI = list(family_models.ALIBI_FAMILIES)
N_PROMPT, N_GEN, CHUNK, B, W = 1000, 16, 64, PAGE, 128  # B: 16 (32 on vLLM 0.32.0, whose CPU attention needs it)
# Sink per family: whole page (sink_pages=1) or the paper's 4 tokens (partial page).
SINK = {name: (dict(sink_pages=1), B) if i % 2 == 0 else (dict(sink_tokens=4), 4) for i, name in enumerate(FAMILIES)}


def served(family: str) -> None:
    """Skip a family the installed vLLM no longer serves with the tested class
    (``vllm_sink.allowlist.NOT_SERVED_ON``)."""
    import vllm

    from vllm_sink.allowlist import checked_on

    arch = type(family_models.config_of(family)).__name__.replace("Config", "ForCausalLM")
    if arch not in checked_on(vllm.__version__):
        pytest.skip(f"vLLM {vllm.__version__} does not serve {arch} with its own class")


@pytest.fixture(scope="module")
def text(hamlet_ids):
    return hamlet_ids[:N_PROMPT]


@pytest.mark.parametrize("family", FAMILIES + ALIBI)
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


def _stream(engines, family, sink, text, *references):
    """Serve ``text`` (+ ``N_GEN`` greedy tokens) on the family's sink engine; compare with
    ``references[0]`` streaming with the same policy. Returns (report, the plugin's
    logprobs, the tokens and steps, the first step that evicts)."""
    from vllm_sink.invariants import ROW_LOG
    from vllm_sink.metrics import SINK_STATS

    sink, S = sink
    path = family_models.model_dir(family)
    llm = engines.get(f"family:{family}:{S}", path, block_size=B, max_num_batched_tokens=CHUNK, max_num_seqs=4,
                      kv_cache_memory_bytes=64 << 20, kv_policy="sink", kv_window=W, max_stream_len=4096, **sink)
    epochs0, evicted0 = SINK_STATS.epochs, SINK_STATS.pages_evicted
    ROW_LOG.clear()
    prompt_lp, gen, gen_lp, _ = run_scored(llm, text, N_GEN)
    plugin = torch.tensor(prompt_lp + gen_lp, dtype=torch.float64)
    tokens = list(text) + gen
    steps = chunked_steps(len(text), CHUNK, len(tokens))
    ref = references[0].stream_logprobs(tokens, steps, sink_tokens=S, window=W, block_size=B)
    dense = references[0].stream_logprobs(tokens, steps, sink_tokens=0, window=None, block_size=B)
    diff = (plugin - ref).abs()
    first_evicted = next(a for a, b in steps if contract_w0(a, S, W, B) > S)
    report = dict(
        tokens=len(diff), max=diff.max().item(), mean=diff.mean().item(),
        control_mean=diff[:first_evicted].mean().item(), evicting_mean=diff[first_evicted:].mean().item(),
        dense_mean=(plugin - dense).abs()[first_evicted:].mean().item(),
        epochs=SINK_STATS.epochs - epochs0, pages_evicted=SINK_STATS.pages_evicted - evicted0,
    )
    for name, other in references[1:]:  # further readings of the same stream, after eviction
        lp = other.stream_logprobs(tokens, steps, sink_tokens=S, window=W, block_size=B)
        report[name] = (plugin - lp).abs()[first_evicted:].mean().item()
    print(f"\n{family} S={S} W={W}: {report}")
    assert report["pages_evicted"] >= (len(text) - W - S) // B - 2, "pages were not evicted"
    assert not check(report, "float32"), (check(report, "float32"), report)
    assert report["dense_mean"] > 100 * F32_MAX_MEAN, report
    if os.environ.get("VLLMSINK_CHECK_ROWS") == "1":
        compared, bad = ROW_LOG.mismatches()
        ROW_LOG.clear()
        assert compared and not bad, f"{len(bad)} of {compared} rows differ: {bad[:3]}"
    return report


@pytest.mark.parametrize("family", FAMILIES)
def test_plugin_matches_family_reference(family, engines, text):
    served(family)
    report = _stream(engines, family, SINK[family], text, reference_for(family_models.model_dir(family)))
    assert report["epochs"] >= 1, "the stream crossed no epoch"


@pytest.mark.parametrize("sink", [(dict(sink_pages=1), B), (dict(sink_tokens=4), 4)], ids=["page", "4"])
@pytest.mark.parametrize("family", ALIBI)
def test_alibi_plugin_matches_reference(family, sink, engines, text):
    """MPT and BLOOM with the sink policy: the engine equals the reference with ALiBi at the
    contract's cache positions, and is far from the reference with ALiBi at the tokens'
    absolute positions (where the sink sits ~1,000 tokens back, not ``S + t - w0``).
    vLLM's BLOOM computes the exact GELU: the reference compared is that one, and the
    tanh reading (transformers') is reported beside it."""
    served(family)
    path = family_models.model_dir(family)
    gelu = dict(gelu="exact") if family == "bloom" else {}
    others = [("absolute_mean", reference_for(path, alibi_positions="absolute", **gelu))]
    if family == "bloom":
        others.append(("tanh_gelu_mean", reference_for(path)))
    report = _stream(engines, family, sink, text, reference_for(path, **gelu), *others)
    assert report["epochs"] == 0, "an ALiBi stream started an epoch"
    assert report["absolute_mean"] > 100 * F32_MAX_MEAN, report
    if family == "bloom":
        assert report["tanh_gelu_mean"] > F32_MAX_MEAN > report["mean"], report


def _model_config(alibi: bool = False, derived: float = float("inf"), architectures=("BloomForCausalLM",), **hf):
    """The fields of vLLM's ModelConfig that ``refusals.check_model`` and
    ``refusals.position_limits`` read."""
    from types import SimpleNamespace

    flags = dict.fromkeys(("is_encoder_decoder", "use_mla", "is_hybrid", "is_attention_free", "uses_mrope",
                           "is_multimodal_model"), False)
    return SimpleNamespace(model="m", runner_type="generate", hf_text_config=SimpleNamespace(**hf),
                           get_sliding_window=lambda: None, uses_alibi=alibi, architectures=list(architectures),
                           model_arch_config=SimpleNamespace(derived_max_model_len_and_key=(derived, None)), **flags)


def test_alibi_config_accepted():
    """An ALiBi config (no RoPE field, no max_position_embeddings) is accepted; its default
    window is half its context as vLLM derives it (MPT's max_seq_len; 2048 for BLOOM, which
    names none), at most 4096, and it never starts an epoch."""
    from vllm_sink.config import SinkConfig
    from vllm_sink.patches.refusals import check_model, position_limits
    from vllm_sink.policy import NO_ROTARY_LIMIT

    check_model(_model_config(alibi=True, model_type="bloom"))
    check_model(_model_config(alibi=True, model_type="mpt", architectures=("MPTForCausalLM",)))
    # ALiBi in an architecture no reference test covers: refused, not served unchecked.
    from vllm_sink.config import SinkConfigError

    with pytest.raises(SinkConfigError, match="has not checked against its reference"):
        check_model(_model_config(alibi=True, model_type="falcon", architectures=("FalconForCausalLM",)))
    assert position_limits(_model_config(alibi=True, model_type="bloom")) == (NO_ROTARY_LIMIT, 2048)
    assert position_limits(_model_config(alibi=True, derived=512, model_type="mpt")) == (NO_ROTARY_LIMIT, 512)
    sink = SinkConfig.from_user({"kv_policy": "sink"})
    assert sink.resolve(block_size=B, rope_limit=NO_ROTARY_LIMIT, context=2048).window == 1024
    assert sink.resolve(block_size=B, rope_limit=NO_ROTARY_LIMIT, context=65536).window == 4096


def test_alibi_context_as_vllm_derives_it():
    """On the tiny models' real configs, vLLM's ModelConfig gives MPT its max_seq_len and
    BLOOM (no length in its config) vLLM's default 2048."""
    from vllm.config import ModelConfig

    from vllm_sink.patches.refusals import position_limits
    from vllm_sink.policy import NO_ROTARY_LIMIT

    for family, context in (("mpt", 512), ("bloom", 2048)):
        mc = ModelConfig(model=str(family_models.model_dir(family)), dtype="float32")
        assert mc.uses_alibi and position_limits(mc) == (NO_ROTARY_LIMIT, context)


def test_alibi_backend_refusal():
    """ALiBi models are served on the backends whose ALiBi bias is the key's index in the
    row (CPU_ATTN, TRITON_ATTN); any other (FLASH_ATTN, ...) is refused at start-up,
    naming the backend to pick."""
    from vllm_sink.config import SinkConfigError
    from vllm_sink.patches.refusals import check_alibi_backend

    check_alibi_backend("CPU_ATTN")
    check_alibi_backend("TRITON_ATTN")
    for name in ("FLASH_ATTN", "FLASHINFER", "FLEX_ATTENTION"):
        with pytest.raises(SinkConfigError, match="--attention-backend TRITON_ATTN"):
            check_alibi_backend(name)


def test_gptj_rotary_dim_counts_as_rope():
    """GPT-J's config names its RoPE only by ``rotary_dim`` (no rope_theta, no
    rope_parameters): accepted (the worker then checks the RotaryEmbedding vLLM built,
    GPT-J style), while a config with neither RoPE nor ALiBi (GPT-2's learned absolute
    positions) is refused."""
    from vllm_sink.config import SinkConfigError
    from vllm_sink.patches.refusals import check_model

    check_model(_model_config(model_type="gptj", rotary_dim=64, max_position_embeddings=2048))
    with pytest.raises(SinkConfigError, match=r"no rotary position embeddings \(RoPE\) and no ALiBi"):
        check_model(_model_config(model_type="gpt2", max_position_embeddings=1024))


def test_mistral_position_scaled_queries_refused():
    """Mistral-format configs with ``llama_4_scaling`` scale each query by a function of its
    absolute position, which the policy re-assigns: refused, while the same config without
    it (the checked family) is accepted."""
    from vllm_sink.config import SinkConfigError
    from vllm_sink.patches.refusals import check_model

    hf = dict(model_type="mistral", rope_theta=1e6, max_position_embeddings=4096)
    check_model(_model_config(architectures=("MistralForCausalLM",), **hf))
    with pytest.raises(SinkConfigError, match="llama_4_scaling"):
        check_model(_model_config(architectures=("MistralForCausalLM",), llama_4_scaling={"beta": 0.1}, **hf))
