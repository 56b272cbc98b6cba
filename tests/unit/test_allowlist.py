"""The architecture allow-list (``patches/refusals.py``: ``CHECKED_ARCHITECTURES``): a model
whose architecture no test checks against the reference is refused at start-up with a
message naming the reason, the checked ones and the escape hatch; a checked one passes; the
escape hatch (``VLLMSINK_ALLOW_UNCHECKED=1``) serves it and logs a warning. No engine."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest

from vllm_sink.config import SinkConfigError


def _model_config(arch: str, alibi: bool = False, use_mla: bool = False, **hf):
    """The fields of vLLM's ModelConfig that ``refusals.check_model`` reads: a full-attention
    RoPE model (or ALiBi) that passes every other start-up check."""
    flags = dict.fromkeys(("is_encoder_decoder", "is_hybrid", "is_attention_free", "uses_mrope",
                           "is_multimodal_model"), False)
    flags["use_mla"] = use_mla
    hf = {"model_type": "m", "rope_theta": 1e4, "max_position_embeddings": 2048, **hf}
    return SimpleNamespace(model="some/model", runner_type="generate", hf_text_config=SimpleNamespace(**hf),
                           get_sliding_window=lambda: None, uses_alibi=alibi, architecture=arch,
                           architectures=[arch], **flags)


@pytest.fixture
def warnings_of_refusals():
    """Records what ``patches.refusals`` logs (vLLM's loggers do not propagate to pytest's)."""
    from vllm_sink.patches import refusals

    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    refusals.logger.addHandler(handler)
    yield records
    refusals.logger.removeHandler(handler)


@pytest.mark.parametrize("arch", ["GraniteForCausalLM", "Olmo2ForCausalLM", "Phi3ForCausalLM", "TransformersForCausalLM"])
def test_unchecked_architecture_refused(arch, monkeypatch):
    from vllm_sink.patches.refusals import check_model

    monkeypatch.delenv("VLLMSINK_ALLOW_UNCHECKED", raising=False)
    with pytest.raises(SinkConfigError) as err:
        check_model(_model_config(arch))
    msg = str(err.value)
    assert msg.startswith(f"architecture {arch}")
    assert "is not checked against the sink policy's reference; checked: LlamaForCausalLM" in msg
    assert "--kv-policy full" in msg and "VLLMSINK_ALLOW_UNCHECKED=1" in msg
    if arch.startswith("Transformers"):
        assert "Transformers modeling backend" in msg


def test_checked_architectures_pass(monkeypatch, warnings_of_refusals):
    import vllm

    from vllm_sink.allowlist import ALIBI_ARCHITECTURES, checked_on
    from vllm_sink.patches.refusals import check_model

    monkeypatch.delenv("VLLMSINK_ALLOW_UNCHECKED", raising=False)
    served = checked_on(vllm.__version__)
    for arch in served:
        check_model(_model_config(arch))
    for arch in ALIBI_ARCHITECTURES:
        if arch in served:
            check_model(_model_config(arch, alibi=True))
    assert not warnings_of_refusals


def test_real_model_config(tmp_path, monkeypatch):
    """On vLLM's own ModelConfig: SmolLM2 resolves to LlamaForCausalLM and passes; the same
    config as a GraniteForCausalLM (Llama's layout with scaling multipliers, full attention:
    every other check passes) reaches the allow-list and is refused."""
    import json
    import shutil

    from vllm.config import ModelConfig

    from vllm_sink import assets
    from vllm_sink.patches.refusals import architecture_of, check_model

    monkeypatch.delenv("VLLMSINK_ALLOW_UNCHECKED", raising=False)
    src = assets.model_dir()
    mc = ModelConfig(model=str(src))
    assert architecture_of(mc) == "LlamaForCausalLM"
    check_model(mc)
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(architectures=["GraniteForCausalLM"], model_type="granite")
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / f, tmp_path / f)
    granite = ModelConfig(model=str(tmp_path))
    assert architecture_of(granite) == "GraniteForCausalLM"
    with pytest.raises(SinkConfigError, match="architecture GraniteForCausalLM is not checked"):
        check_model(granite)


def test_unchecked_alibi_refused(monkeypatch):
    from vllm_sink.patches.refusals import check_model

    monkeypatch.delenv("VLLMSINK_ALLOW_UNCHECKED", raising=False)
    with pytest.raises(SinkConfigError, match="uses ALiBi in an architecture vllm-sink has not checked against its "
                                              "reference .*VLLMSINK_ALLOW_UNCHECKED=1"):
        check_model(_model_config("BaichuanForCausalLM", alibi=True))
    # an architecture checked with RoPE only (Falcon) is not checked with ALiBi
    with pytest.raises(SinkConfigError, match="uses ALiBi"):
        check_model(_model_config("FalconForCausalLM", alibi=True))


def test_escape_hatch_serves_and_warns(monkeypatch, warnings_of_refusals):
    from vllm_sink.patches.refusals import check_model

    monkeypatch.setenv("VLLMSINK_ALLOW_UNCHECKED", "1")
    check_model(_model_config("GraniteForCausalLM"))
    check_model(_model_config("BaichuanForCausalLM", alibi=True))
    assert len(warnings_of_refusals) == 2
    text = warnings_of_refusals[0].getMessage()
    assert "GraniteForCausalLM" in text and "not checked" in text and "VLLMSINK_ALLOW_UNCHECKED=1" in text
    assert warnings_of_refusals[0].levelno == logging.WARNING
    # the escape hatch opens the allow-list only: every other refusal still applies
    with pytest.raises(SinkConfigError, match="multi-head latent attention"):
        check_model(_model_config("DeepseekV2ForCausalLM", use_mla=True))
    with pytest.raises(SinkConfigError, match="rope_type='longrope'"):
        check_model(_model_config("Phi3ForCausalLM", rope_parameters={"rope_type": "longrope"}))
    monkeypatch.setenv("VLLMSINK_ALLOW_UNCHECKED", "0")
    with pytest.raises(SinkConfigError, match="not checked"):
        check_model(_model_config("GraniteForCausalLM"))


def test_allowlist_matches_vllm_registry():
    """Every checked name is a text-generation architecture of vLLM's registry, and every
    same-class alias resolves to exactly its tested name's module and class (a vLLM upgrade
    that moves one fails here, not silently)."""
    from vllm.model_executor.models.registry import _TEXT_GENERATION_MODELS

    from vllm_sink.allowlist import (
        ALIBI_ARCHITECTURES,
        CHECKED_ARCHITECTURES,
        SAME_CLASS_ALIASES,
        TESTED_ARCHITECTURES,
    )

    import vllm

    from vllm_sink.allowlist import NOT_SERVED_ON, checked_on
    from vllm_sink.patches.bindings import SUPPORTED_VLLM

    served = checked_on(vllm.__version__)
    assert set(served) <= set(_TEXT_GENERATION_MODELS)
    assert set(ALIBI_ARCHITECTURES) <= set(CHECKED_ARCHITECTURES)
    for alias, target in SAME_CLASS_ALIASES.items():
        assert target in TESTED_ARCHITECTURES
        if alias in served:
            assert _TEXT_GENERATION_MODELS[alias] == _TEXT_GENERATION_MODELS[target], alias
    # What a version no longer serves is gone from its registry or on the Transformers backend.
    for arch in set(CHECKED_ARCHITECTURES) - set(served):
        assert _TEXT_GENERATION_MODELS.get(arch, ("transformers",))[0] == "transformers", arch
    assert set(NOT_SERVED_ON) <= set(SUPPORTED_VLLM)
    for arch, test in CHECKED_ARCHITECTURES.items():
        assert "tests/test_" in test, arch


def test_checked_name_on_the_transformers_backend_refused(monkeypatch):
    """A checked name run by vLLM's Transformers modeling backend (model_impl='transformers')
    is another implementation than the class its test checks: refused."""
    from vllm_sink.patches.refusals import check_model

    monkeypatch.delenv("VLLMSINK_ALLOW_UNCHECKED", raising=False)
    mc = _model_config("LlamaForCausalLM")
    mc.using_transformers_backend = lambda: True
    with pytest.raises(SinkConfigError, match=r"architecture LlamaForCausalLM \(run by vLLM's Transformers modeling backend"):
        check_model(mc)
    mc.using_transformers_backend = lambda: False
    check_model(mc)


def test_families_doc_is_this_vllms():
    """docs/families.md and docs/families.json are what scripts/registry_sweep.py gives for
    the installed vLLM and the current refusals (a vLLM upgrade or a new check re-runs it)."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    run = subprocess.run([sys.executable, str(root / "scripts" / "registry_sweep.py"), "--check"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
