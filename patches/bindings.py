"""Every vLLM symbol vllm-sink binds to, in one table, and the one way it wraps them.

``BINDINGS`` lists each symbol the plugin wraps, wraps per instance, overrides in a subclass,
subclasses, calls or reads: its module (the import path the plugin uses), its name within
the module, the kind of binding, the side that binds it (front end, scheduler, worker,
shared), and the vLLM versions it is known to hold for. A wrapped, per-instance wrapped or
overridden function records its parameters (names and kinds, no annotations; a record that
ends in ``...`` names the leading ones, which the wrap uses, and the wrap forwards the rest
untouched), so that a vLLM whose function changed shape is caught before a step runs.

* ``SUPPORTED_VLLM``: the vLLM versions the plugin runs on; ``check_version`` refuses any
  other at start-up (``patches.install``), with a ``SinkConfigError`` naming them. Most
  entries hold for every supported version; the few that differ are recorded once per
  version (``V026``, ``V032``), and ``active(version)`` is the table for one version.
* ``wrap_once``: the only way the plugin replaces a vLLM attribute. It refuses a symbol that
  is not in the table, wraps once (idempotent: vLLM may load the plugin twice in one
  process), marks the wrap (``_vllm_sink``) and keeps the original (``__wrapped__``).
* ``problems(binding)``: what does not hold for one entry in the installed vLLM (the symbol
  is missing, or its parameters differ); ``tests/unit/test_bindings.py`` checks every entry,
  and that every ``from vllm... import`` in ``patches/`` and every override in the plugin's
  subclasses is listed.

Upgrading vLLM means editing this table (and the bindings whose entries fail) and nothing
else. Importing this module imports nothing from vLLM.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable

SUPPORTED_VLLM = ("0.26.0", "0.32.0")
V026, V032 = ("0.26.0",), ("0.32.0",)  # an entry that holds for one version only

# Behaviours of vLLM the plugin relies on that no symbol shows, per version:
# "lone_request_uncapped": the scheduler does not apply ``long_prefill_token_threshold`` to a
# request alone in the batch (``SchedulerConfig.long_prefill_token_threshold``'s docstring):
# one sequence may then compute the whole step budget.
BEHAVIOURS = {
    "lone_request_uncapped": ("0.32.0",),
}

# Kinds of binding.
WRAP = "wrap"                    # a class's method/property (or a module's function) replaced by a wrap
INSTANCE_WRAP = "instance-wrap"  # a method replaced on one instance (a sink engine's runner or batch)
OVERRIDE = "override"            # a method of a vLLM base class overridden in the plugin's subclass
SUBCLASS = "subclass"            # a vLLM class the plugin subclasses
CALL = "call"                    # a function, method or class the plugin calls or builds
READ = "read"                    # an attribute, field, constant or enum member the plugin reads or sets
ENV = "env"                      # an environment variable of vLLM's (``vllm.envs``) the plugin reads or sets
KINDS = (WRAP, INSTANCE_WRAP, OVERRIDE, SUBCLASS, CALL, READ, ENV)
SIGNED = (WRAP, INSTANCE_WRAP, OVERRIDE)

MARK = "_vllm_sink"


@dataclass(frozen=True)
class Binding:
    """One vLLM symbol: ``module`` (the import path used), ``name`` (dotted within the module:
    ``Class.attribute``), ``kind``, ``side``, ``params`` (for a signed kind: the function's
    parameters as ``params_of`` writes them), ``versions``."""

    side: str
    kind: str
    module: str
    name: str
    params: str | None = None
    versions: tuple[str, ...] = SUPPORTED_VLLM

    @property
    def private(self) -> bool:
        """Whether any part of the name is private to vLLM (``_x``, not ``__x__``)."""
        return any(p.startswith("_") and not p.endswith("__") for p in self.name.split("."))

    @property
    def key(self) -> tuple[str, str]:
        return self.module, self.name


def _rows(side: str, kind: str, module: str, owner: str, names: str,
          versions: tuple[str, ...] = SUPPORTED_VLLM) -> list[Binding]:
    """Unsigned entries ``owner.name`` (``owner`` empty: module-level) for each whitespace-
    separated name."""
    return [Binding(side, kind, module, f"{owner}.{n}" if owner else n, None, versions) for n in names.split()]


def _signed(side: str, kind: str, module: str, name: str, params: str,
            versions: tuple[str, ...] = SUPPORTED_VLLM) -> Binding:
    return Binding(side, kind, module, name, params, versions)


FRONTEND, SCHEDULER, WORKER, SHARED, BENCHMARKS = "frontend", "scheduler", "worker", "shared", "benchmarks"

BINDINGS: tuple[Binding, ...] = (
    *_rows(SHARED, CALL, "vllm.logger", "", "init_logger"),
    # ------------------------------------------------------------------ front end
    _signed(FRONTEND, WRAP, "vllm.engine.arg_utils", "EngineArgs.add_cli_args", "parser"),
    _signed(FRONTEND, WRAP, "vllm.engine.arg_utils", "EngineArgs.from_cli_args", "cls, args"),
    _signed(FRONTEND, WRAP, "vllm.engine.arg_utils", "EngineArgs.create_engine_config",
            "self, usage_context=, headless="),
    *_rows(FRONTEND, READ, "vllm.engine.arg_utils", "EngineArgs",
           "additional_config max_model_len speculative_config kv_transfer_config "
           "kv_cache_dtype decode_context_parallel_size prefill_context_parallel_size "
           "pipeline_parallel_size block_size model"),
    *_rows(FRONTEND, READ, "vllm.engine.arg_utils", "EngineArgs", "_api_process_count _api_process_rank"),
    # 0.32.0 removed cascade attention (the field stays, deprecated, and warns when set).
    *_rows(FRONTEND, READ, "vllm.engine.arg_utils", "EngineArgs", "disable_cascade_attn", V026),
    _signed(FRONTEND, WRAP, "vllm.entrypoints.llm", "LLM.__init__", "self, model, *, runner=, ..."),
    *_rows(FRONTEND, ENV, "vllm.envs", "",
           "VLLM_RAY_EXTRA_ENV_VARS_TO_COPY VLLM_ALLOW_LONG_MAX_MODEL_LEN VLLM_USE_V2_MODEL_RUNNER"),
    *_rows(FRONTEND, CALL, "vllm.envs", "", "_is_envs_cache_enabled disable_envs_cache enable_envs_cache"),
    *_rows(FRONTEND, CALL, "vllm.utils.argparse_utils", "", "human_readable_int"),
    _signed(FRONTEND, WRAP, "vllm.config", "VllmConfig.use_v2_model_runner", "self"),
    *_rows(FRONTEND, READ, "vllm.config", "VllmConfig", "additional_config model_config"),
    *_rows(FRONTEND, READ, "vllm.config", "SchedulerConfig",
           "long_prefill_token_threshold max_num_batched_tokens max_num_scheduled_tokens"),
    _signed(FRONTEND, WRAP, "vllm.v1.engine.input_processor", "InputProcessor._validate_params",
            "self, params, supported_tasks"),
    _signed(FRONTEND, WRAP, "vllm.v1.engine.input_processor", "InputProcessor.process_inputs",
            "self, request_id, prompt, params, supported_tasks, arrival_time=, lora_request=, "
            "tokenization_kwargs=, trace_headers=, priority=, data_parallel_rank=, resumable=, ..."),
    *_rows(FRONTEND, READ, "vllm.v1.engine.input_processor", "InputProcessor", "vllm_config"),
    *_rows(FRONTEND, READ, "vllm.sampling_params", "", "SamplingParams RequestOutputKind"),
    *_rows(FRONTEND, READ, "vllm.sampling_params", "SamplingParams", "extra_args output_kind"),
    _signed(FRONTEND, WRAP, "vllm.renderers.base", "BaseRenderer._tokenize_prompt", "self, prompt, params"),
    *_rows(FRONTEND, READ, "vllm.renderers.base", "BaseRenderer",
           "config get_tokenizer _wants_offsets _build_tokens_prompt render_messages_async "
           "tokenize_prompt_async"),
    *_rows(FRONTEND, CALL, "vllm.renderers.params", "TokenizeParams", "get_encode_kwargs"),
    *_rows(FRONTEND, CALL, "vllm.renderers.params", "ChatParams", "with_defaults"),
    *_rows(FRONTEND, READ, "vllm.renderers.params", "ChatParams", "return_assistant_tokens_mask", V026),
    _signed(FRONTEND, WRAP, "vllm.renderers.online_renderer", "OnlineRenderer.preprocess_chat",
            "self, request, messages, default_template, default_template_content_format, "
            "default_template_kwargs, tool_dicts=, parser=, *, skip_mm_cache="),
    *_rows(FRONTEND, READ, "vllm.renderers.online_renderer", "OnlineRenderer", "renderer model_config"),
    *_rows(FRONTEND, CALL, "vllm.renderers", "", "merge_kwargs"),
    *_rows(FRONTEND, CALL, "vllm.utils.mistral", "", "is_mistral_tokenizer"),
    _signed(FRONTEND, WRAP, "vllm.v1.engine.detokenizer", "FastIncrementalDetokenizer.__init__",
            "self, tokenizer, request"),
    _signed(FRONTEND, WRAP, "vllm.v1.engine.detokenizer", "BaseIncrementalDetokenizer.get_next_output_text",
            "self, finished, delta"),
    *_rows(FRONTEND, READ, "vllm.v1.engine.detokenizer", "FastIncrementalDetokenizer",
           "tokenizer skip_special_tokens stream"),
    *_rows(FRONTEND, READ, "vllm.v1.engine.detokenizer", "BaseIncrementalDetokenizer",
           "token_ids output_text stop _last_output_text_offset"),
    *_rows(FRONTEND, READ, "vllm.v1.engine", "EngineCoreRequest", "prompt_token_ids sampling_params"),
    # ------------------------------------------------------------------ shared
    *_rows(SHARED, SUBCLASS, "vllm.v1.kv_cache_interface", "", "FullAttentionSpec"),
    _signed(SHARED, OVERRIDE, "vllm.v1.kv_cache_interface", "FullAttentionSpec.max_memory_usage_bytes",
            "self, vllm_config"),
    _signed(SHARED, OVERRIDE, "vllm.v1.kv_cache_interface", "FullAttentionSpec.max_num_blocks_per_req",
            "self, vllm_config, max_len"),
    _signed(SHARED, OVERRIDE, "vllm.v1.kv_cache_interface", "FullAttentionSpec.merge", "cls, specs"),
    *_rows(SHARED, READ, "vllm.v1.kv_cache_interface", "FullAttentionSpec",
           "block_size sliding_window attention_chunk_size non_causal kv_quant_mode page_size_bytes"),
    *_rows(SHARED, READ, "vllm.v1.kv_cache_interface", "", "KVQuantMode"),
    *_rows(SHARED, READ, "vllm.config", "ModelConfig",
           "model runner_type is_encoder_decoder use_mla is_hybrid is_attention_free uses_mrope "
           "uses_alibi is_multimodal_model get_sliding_window hf_text_config model_arch_config "
           "architecture using_transformers_backend max_model_len get_num_kv_heads get_head_size dtype"),
    *_rows(SHARED, CALL, "vllm.v1.worker.gpu_model_runner", "", "GPUModelRunner"),
    # ------------------------------------------------------------------ scheduler
    *_rows(SCHEDULER, SUBCLASS, "vllm.v1.core.single_type_kv_cache_manager", "", "FullAttentionManager"),
    _signed(SCHEDULER, OVERRIDE, "vllm.v1.core.single_type_kv_cache_manager", "FullAttentionManager.__init__",
            "self, kv_cache_spec, ..."),
    _signed(SCHEDULER, OVERRIDE, "vllm.v1.core.single_type_kv_cache_manager", "FullAttentionManager.free",
            "self, request_id"),
    _signed(SCHEDULER, OVERRIDE, "vllm.v1.core.single_type_kv_cache_manager",
            "FullAttentionManager.get_num_blocks_to_allocate",
            "self, request_id, num_tokens, new_computed_blocks, ..."),
    _signed(SCHEDULER, OVERRIDE, "vllm.v1.core.single_type_kv_cache_manager",
            "FullAttentionManager.add_local_computed_blocks",
            "self, request_id, new_computed_blocks, num_local_computed_tokens, ..."),
    _signed(SCHEDULER, OVERRIDE, "vllm.v1.core.single_type_kv_cache_manager",
            "FullAttentionManager.allocate_new_blocks",
            "self, request_id, num_tokens, num_tokens_main_model"),
    _signed(SCHEDULER, OVERRIDE, "vllm.v1.core.single_type_kv_cache_manager",
            "FullAttentionManager.remove_skipped_blocks",
            "self, request_id, processed_computed_tokens, num_prompt_tokens="),
    _signed(SCHEDULER, OVERRIDE, "vllm.v1.core.single_type_kv_cache_manager",
            "FullAttentionManager.get_num_common_prefix_blocks", "self, running_request_id", V026),
    _signed(SCHEDULER, OVERRIDE, "vllm.v1.core.single_type_kv_cache_manager",
            "FullAttentionManager.pop_blocks_for_free", "self, request_id"),
    _signed(SCHEDULER, OVERRIDE, "vllm.v1.core.single_type_kv_cache_manager",
            "FullAttentionManager.new_step_starts", "self"),
    _signed(SCHEDULER, OVERRIDE, "vllm.v1.core.single_type_kv_cache_manager",
            "FullAttentionManager.cache_blocks", "self, request, num_tokens, retention_interval=", V026),
    _signed(SCHEDULER, OVERRIDE, "vllm.v1.core.single_type_kv_cache_manager",
            "FullAttentionManager.cache_blocks",
            "self, request, num_tokens, retention_interval=, *, replay_boundaries", V032),
    *_rows(SCHEDULER, READ, "vllm.v1.core.single_type_kv_cache_manager", "FullAttentionManager",
           "req_to_blocks num_cached_block block_pool kv_cache_spec dcp_world_size pcp_world_size "
           "enable_caching"),
    *_rows(SCHEDULER, READ, "vllm.v1.core.block_pool", "BlockPool",
           "null_block free_blocks get_num_free_blocks num_gpu_blocks get_new_blocks touch free_block_queue"),
    *_rows(SCHEDULER, CALL, "vllm.v1.core.kv_cache_utils", "FreeKVCacheBlockQueue", "append_n prepend_n remove"),
    *_rows(SCHEDULER, READ, "vllm.v1.core.kv_cache_utils", "KVCacheBlock", "block_id block_hash ref_cnt is_null"),
    *_rows(SCHEDULER, CALL, "vllm.v1.core.single_type_kv_cache_manager", "", "register_all_kvcache_specs"),
    *_rows(SCHEDULER, CALL, "vllm.v1.kv_cache_spec_registry", "KVCacheSpecRegistry", "register"),
    _signed(SCHEDULER, WRAP, "vllm.v1.core.kv_cache_manager", "KVCacheManager.allocate_slots",
            "self, request, ..."),
    _signed(SCHEDULER, WRAP, "vllm.v1.core.kv_cache_manager", "KVCacheManager.free", "self, request"),
    _signed(SCHEDULER, WRAP, "vllm.v1.core.kv_cache_manager", "KVCacheManager.get_computed_blocks",
            "self, request"),
    *_rows(SCHEDULER, READ, "vllm.v1.core.kv_cache_manager", "KVCacheManager", "coordinator block_pool"),
    _signed(SCHEDULER, WRAP, "vllm.v1.core.sched.scheduler", "Scheduler.schedule", "self, ..."),
    *_rows(SCHEDULER, READ, "vllm.v1.request", "", "RequestStatus"),
    *_rows(SCHEDULER, READ, "vllm.v1.request", "RequestStatus", "WAITING FINISHED_STOPPED FINISHED_LENGTH_CAPPED"),
    *_rows(SCHEDULER, READ, "vllm.v1.request", "Request",
           "request_id status prompt_token_ids num_prompt_tokens num_computed_tokens max_tokens block_hashes _block_hasher "
           "sampling_params _all_token_ids _output_token_ids all_token_ids output_token_ids "
           "resumable structured_output_request skip_reading_prefix_cache prompt_embeds lora_request "
           "cache_salt"),
    *_rows(SCHEDULER, CALL, "vllm.v1.utils", "", "ConstantList"),
    # ------------------------------------------------------------------ worker
    _signed(WORKER, WRAP, "vllm.v1.worker.gpu_model_runner", "GPUModelRunner.__init__",
            "self, vllm_config, device"),
    _signed(WORKER, WRAP, "vllm.v1.worker.gpu_model_runner", "GPUModelRunner.get_kv_cache_spec", "self"),
    _signed(WORKER, INSTANCE_WRAP, "vllm.v1.worker.gpu_model_runner", "GPUModelRunner._update_states",
            "self, scheduler_output"),
    _signed(WORKER, INSTANCE_WRAP, "vllm.v1.worker.gpu_model_runner", "GPUModelRunner._prepare_inputs",
            "self, scheduler_output, num_scheduled_tokens"),
    _signed(WORKER, INSTANCE_WRAP, "vllm.v1.worker.gpu_model_runner", "GPUModelRunner._sample",
            "self, logits, spec_decode_metadata"),
    _signed(WORKER, INSTANCE_WRAP, "vllm.v1.worker.gpu_model_runner", "GPUModelRunner._bookkeeping_sync",
            "self, scheduler_output, ..."),
    *_rows(WORKER, READ, "vllm.v1.worker.gpu_model_runner", "GPUModelRunner",
           "vllm_config device input_batch requests positions optimistic_seq_lens_cpu req_indices "
           "kv_caches get_model max_model_len attn_groups discard_request_mask use_async_scheduling"),
    _signed(WORKER, INSTANCE_WRAP, "vllm.v1.worker.gpu_input_batch", "InputBatch.add_request", "self, request"),
    _signed(WORKER, INSTANCE_WRAP, "vllm.v1.worker.gpu_input_batch",
            "InputBatch._make_prompt_token_ids_cpu_tensor", "self"),
    *_rows(WORKER, READ, "vllm.v1.worker.gpu_input_batch", "InputBatch",
           "num_reqs req_ids token_ids_cpu is_token_ids num_tokens_no_spec num_computed_tokens_cpu "
           "num_prompt_tokens req_prompt_embeds vocab_size block_table generators"),
    *_rows(WORKER, READ, "vllm.v1.worker.gpu_input_batch", "CachedRequestState",
           "req_id block_ids prompt_token_ids prompt_is_token_ids prompt_embeds output_token_ids "
           "sampling_params num_prompt_tokens"),
    *_rows(WORKER, READ, "vllm.v1.worker.block_table", "MultiGroupBlockTable", "block_tables"),
    *_rows(WORKER, READ, "vllm.v1.worker.block_table", "BlockTable", "block_table num_blocks_per_row"),
    # 0.26.0's table rows hold kernel blocks (blocks_per_kv_block of them per page); 0.32.0's
    # hold pages, mapped to kernel blocks when the attention metadata is built.
    *_rows(WORKER, READ, "vllm.v1.worker.block_table", "BlockTable", "blocks_per_kv_block", V026),
    *_rows(WORKER, READ, "vllm.v1.core.sched.output", "SchedulerOutput",
           "scheduled_new_reqs scheduled_cached_reqs num_scheduled_tokens total_num_scheduled_tokens "
           "finished_req_ids"),
    *_rows(WORKER, READ, "vllm.v1.core.sched.output", "NewRequestData", "req_id num_computed_tokens block_ids"),
    *_rows(WORKER, READ, "vllm.v1.core.sched.output", "CachedRequestData",
           "req_ids resumed_req_ids all_token_ids num_output_tokens"),
    # vLLM's V2 model runner (``patches.worker.runner_v2``)
    _signed(WORKER, WRAP, "vllm.v1.worker.gpu.model_runner", "GPUModelRunner.__init__",
            "self, vllm_config, device"),
    _signed(WORKER, WRAP, "vllm.v1.worker.gpu.model_runner", "GPUModelRunner.get_kv_cache_spec", "self"),
    _signed(WORKER, INSTANCE_WRAP, "vllm.v1.worker.gpu.model_runner", "GPUModelRunner.update_requests",
            "self, scheduler_output"),
    _signed(WORKER, INSTANCE_WRAP, "vllm.v1.worker.gpu.model_runner", "GPUModelRunner.prepare_attn",
            "self, input_batch"),
    _signed(WORKER, INSTANCE_WRAP, "vllm.v1.worker.gpu.model_runner", "GPUModelRunner.sample",
            "self, hidden_states, input_batch, grammar_output"),
    *_rows(WORKER, READ, "vllm.v1.worker.gpu.model_runner", "GPUModelRunner",
           "vllm_config device req_states block_tables kv_caches get_model max_model_len attn_groups"),
    _signed(WORKER, INSTANCE_WRAP, "vllm.v1.worker.gpu.states", "RequestState.add_request",
            "self, req_id, prompt_len, all_token_ids, num_computed_tokens, max_tokens"),
    *_rows(WORKER, READ, "vllm.v1.worker.gpu.states", "RequestState",
           "req_id_to_index index_to_req_id all_token_ids num_computed_tokens num_computed_tokens_np "
           "num_computed_prefill_tokens prefill_len prompt_len total_len"),
    *_rows(WORKER, CALL, "vllm.v1.worker.gpu.block_table", "BlockTables", "append_block_ids"),
    *_rows(WORKER, READ, "vllm.v1.worker.gpu.block_table", "BlockTables",
           "block_tables num_kv_cache_groups max_num_reqs"),
    *_rows(WORKER, READ, "vllm.v1.worker.gpu.block_table", "BlockTables", "blocks_per_kv_block", V026),
    *_rows(WORKER, CALL, "vllm.v1.worker.gpu.buffer_utils", "StagedWriteTensor",
           "stage_write stage_write_elem apply_write"),
    *_rows(WORKER, CALL, "vllm.v1.worker.gpu.buffer_utils", "UvaBackedTensor", "copy_to_uva"),
    *_rows(WORKER, READ, "vllm.v1.worker.gpu.input_batch", "InputBatch",
           "req_ids num_scheduled_tokens num_tokens positions"),
    *_rows(WORKER, READ, "vllm.v1.core.sched.output", "SchedulerOutput", "preempted_req_ids"),
    *_rows(SHARED, READ, "vllm.v1.core.sched.output", "NewRequestData", "prefill_token_ids prompt_token_ids"),
    *_rows(WORKER, READ, "vllm.v1.core.sched.output", "CachedRequestData", "new_block_ids"),
    _signed(WORKER, WRAP, "vllm.v1.worker.gpu_worker", "Worker.get_kv_cache_spec", "self"),
    *_rows(WORKER, READ, "vllm.v1.worker.gpu_worker", "Worker", "model_runner vllm_config"),
    *_rows(WORKER, READ, "vllm.model_executor.layers.rotary_embedding.base", "", "RotaryEmbeddingBase"),
    *_rows(WORKER, READ, "vllm.model_executor.layers.rotary_embedding.base", "RotaryEmbeddingBase",
           "rotary_dim is_neox_style cos_sin_cache _compute_cos_sin_cache"),
    *_rows(WORKER, CALL, "vllm.config", "", "get_layers_from_vllm_config"),
    *_rows(WORKER, READ, "vllm.model_executor.layers.attention_layer_base", "", "AttentionLayerBase"),
    *_rows(WORKER, CALL, "vllm.model_executor.layers.attention_layer_base", "AttentionLayerBase",
           "get_attn_backend"),
    *_rows(WORKER, CALL, "vllm.v1.attention.backends.cpu_attn", "", "_get_attn_isa"),
    # ------------------------------------------------------------------ benchmarks (not the plugin)
    _signed(BENCHMARKS, WRAP, "vllm.v1.worker.gpu_model_runner", "async_tensor_h2d",
            "data, device, dtype=", V026),
    _signed(BENCHMARKS, WRAP, "vllm.v1.worker.gpu_model_runner", "async_tensor_h2d",
            "data, device=, dtype=, out=", V032),
)



def active(version: str | None = None) -> tuple[Binding, ...]:
    """The entries that hold for ``version`` (default: the installed vLLM's)."""
    v = base_version(version or installed_version())
    return tuple(b for b in BINDINGS if v in b.versions)


def installed_version() -> str:
    """The installed vLLM's version, without a build's local label."""
    import vllm

    return base_version(vllm.__version__)


@functools.cache
def _by_key(version: str) -> dict[tuple[str, str], Binding]:
    return {b.key: b for b in active(version)}


def behaves(behaviour: str) -> bool:
    """Whether the installed vLLM shows ``behaviour`` (a key of ``BEHAVIOURS``)."""
    return installed_version() in BEHAVIOURS[behaviour]


def holds(module: str, name: str) -> bool:
    """Whether the entry ``module.name`` holds for the installed vLLM (for the few bindings
    that differ between supported versions)."""
    return (module, name) in _by_key(installed_version())


def counts(bindings: Iterable[Binding] = BINDINGS) -> dict[str, int]:
    """Entries per kind, and how many name something private to vLLM."""
    out = {kind: 0 for kind in KINDS}
    private = 0
    for b in bindings:
        out[b.kind] += 1
        private += b.private
    out["private"] = private
    return out


# ---------------------------------------------------------------------- checks
def params_of(fn: Callable) -> str:
    """A function's parameters as the table records them: names, ``=`` after one with a
    default, ``*``/``**`` for variadics, a bare ``*`` before keyword-only ones; no
    annotations (the original's, through ``__wrapped__``)."""
    sig = inspect.signature(fn, follow_wrapped=True)
    out, star = [], False
    for p in sig.parameters.values():
        if p.kind is p.VAR_POSITIONAL:
            out.append("*" + p.name)
            star = True
            continue
        if p.kind is p.VAR_KEYWORD:
            out.append("**" + p.name)
            continue
        if p.kind is p.KEYWORD_ONLY and not star:
            out.append("*")
            star = True
        out.append(p.name + ("=" if p.default is not p.empty else ""))
    return ", ".join(out)


def function_of(raw: Any) -> Any:
    """The plain function under a descriptor as a class holds it (a property's getter, a
    static or class method's function); anything else as it is."""
    if isinstance(raw, property):
        return raw.fget
    if isinstance(raw, (staticmethod, classmethod)):
        return raw.__func__
    return raw


def _unwrap(obj: Any) -> Any:
    obj = function_of(obj)
    while getattr(obj, MARK, False):
        obj = obj.__wrapped__
    return obj


def _instance_attribute(cls: type, attr: str) -> bool:
    """Whether instances of ``cls`` get ``attr``: assigned as ``self.attr`` in the source of
    a class in its MRO (alone or first of a tuple of targets), or a dataclass / msgspec /
    pydantic field."""
    pattern = re.compile(rf"\bself\.{re.escape(attr)}\s*(:[^=\n]*|,[^=]*)?=(?!=)")
    for klass in cls.__mro__:
        if klass is object:
            continue
        if attr in getattr(klass, "__annotations__", {}) or attr in getattr(klass, "__struct_fields__", ()):
            return True
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        if pattern.search(source):
            return True
    return False


def resolve(binding: Binding) -> Any:
    """The symbol in the installed vLLM (statically, as the class defines it), or raise
    ``LookupError``."""
    try:
        obj: Any = importlib.import_module(binding.module)
    except ImportError as e:
        raise LookupError(f"module {binding.module} does not import: {e}") from e
    parts = binding.name.split(".")
    for i, part in enumerate(parts):
        try:
            obj = inspect.getattr_static(obj, part)
        except AttributeError:
            if inspect.isclass(obj) and i == len(parts) - 1 and _instance_attribute(obj, part):
                return None  # an instance attribute: exists, no static value
            raise LookupError(f"{binding.module}.{'.'.join(parts[: i + 1])} does not exist") from None
    return obj


def problems(binding: Binding) -> list[str]:
    """What does not hold for ``binding`` in the installed vLLM (empty: it holds)."""
    where = f"{binding.module}.{binding.name} ({binding.kind})"
    if binding.kind == ENV:
        envs = importlib.import_module(binding.module)
        return [] if binding.name in envs.environment_variables else [f"{where}: vLLM does not read it"]
    try:
        obj = resolve(binding)
    except LookupError as e:
        return [f"{where}: {e}"]
    if binding.kind == SUBCLASS and not inspect.isclass(obj):
        return [f"{where}: not a class"]
    if binding.kind in SIGNED:
        fn = _unwrap(obj)
        if not callable(fn):
            return [f"{where}: not a function"]
        found = params_of(fn)
        recorded = binding.params or ""
        if recorded.endswith(", ..."):  # the wrap names these and forwards the rest untouched
            head = recorded[: -len(", ...")]
            ok = found == head or found.startswith(head + ", ")
        else:
            ok = found == recorded
        if not ok:
            return [f"{where}: parameters ({found}), recorded ({recorded})"]
    return []


# ---------------------------------------------------------------------- versions
def base_version(version: str) -> str:
    """``0.26.0+cpu`` -> ``0.26.0`` (a build's local label is not a version of its own)."""
    return version.split("+", 1)[0]


def check_version(version: str) -> None:
    """Refuse a vLLM version the table does not record."""
    if base_version(version) in SUPPORTED_VLLM:
        return
    from vllm_sink.config import SinkConfigError

    raise SinkConfigError(
        f"vllm-sink supports vLLM {', '.join(SUPPORTED_VLLM)}; this is vLLM {version}, whose "
        "internals the plugin has not been checked against. Install a supported vLLM "
        f"(pip install vllm=={SUPPORTED_VLLM[-1]}), or run this vLLM without the plugin "
        "(uninstall vllm-sink, or set VLLM_PLUGINS to the plugins you want, without vllm_sink)"
    )


# ---------------------------------------------------------------------- the wrap helper
def _owner_key(owner: Any, name: str) -> tuple[str, str] | None:
    """The table key of ``owner.name``: for a module, (module, name); for a class or an
    instance, the first class in its MRO whose entry is in the table (for the installed vLLM)."""
    by_key = _by_key(installed_version())
    if inspect.ismodule(owner):
        key = (owner.__name__, name)
        return key if key in by_key else None
    classes = owner.__mro__ if inspect.isclass(owner) else type(owner).__mro__
    for cls in classes:
        for key in by_key:
            if key[1] == f"{cls.__qualname__}.{name}" and _same_class(key[0], cls):
                return key
    return None


def _same_class(module: str, cls: type) -> bool:
    """Whether ``cls`` is the class the table names under ``module`` (which may re-export it)."""
    mod = importlib.import_module(module)
    return getattr(mod, cls.__qualname__.split(".")[0], None) is cls or cls.__module__ == module


def wrap_once(owner: Any, name: str, make: Callable[[Callable], Callable]) -> bool:
    """Replace ``owner.name`` by ``make(original)``, unless it is already ours; returns
    whether it wrapped. Refuses (``LookupError``) a symbol ``BINDINGS`` does not list as a
    wrap of that kind.

    ``owner`` is a class (its method, static method, class method or property getter, put
    back under the same kind of descriptor), a module (its function), or an instance (a
    per-instance wrap: ``make`` receives the *bound* method and returns a plain function
    with the bound signature, set on the instance). The replacement is marked
    (``_vllm_sink``), keeps the original as ``__wrapped__`` and, if it has none, its
    docstring."""
    key = _owner_key(owner, name)
    instance = not inspect.isclass(owner) and not inspect.ismodule(owner)
    expected = INSTANCE_WRAP if instance else WRAP
    if key is None or _by_key(installed_version())[key].kind != expected:
        where = getattr(owner, "__name__", type(owner).__name__)
        raise LookupError(f"vllm-sink: {where}.{name} is not listed as a {expected} in "
                          "vllm_sink.patches.bindings.BINDINGS")
    raw = inspect.getattr_static(owner, name) if inspect.isclass(owner) else getattr(owner, name)
    orig = function_of(raw)
    if is_wrapped(orig):
        return False
    new = make(orig)
    setattr(new, MARK, True)
    new.__wrapped__ = orig
    if new.__doc__ is None:
        new.__doc__ = orig.__doc__
    if isinstance(raw, property):
        setattr(owner, name, property(new, raw.fset, raw.fdel, raw.__doc__))
    elif isinstance(raw, (staticmethod, classmethod)):
        setattr(owner, name, type(raw)(new))
    else:
        setattr(owner, name, new)
    return True


def is_wrapped(fn: Any) -> bool:
    return bool(getattr(fn, MARK, False))
