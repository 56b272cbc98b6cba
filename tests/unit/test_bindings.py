"""The table of bindings (``vllm_sink.patches.bindings``) against the installed vLLM.

Every entry resolves, every wrapped or overridden function has the parameters recorded, every
``from vllm... import`` in ``patches/`` and every method the plugin's subclasses override is
listed, ``wrap_once`` refuses what is not listed, and a vLLM version the table does not
record is refused at start-up.
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

from vllm_sink.patches import bindings
from vllm_sink.patches.bindings import BINDINGS, INSTANCE_WRAP, OVERRIDE, WRAP

PATCHES = Path(bindings.__file__).resolve().parent
pytestmark = pytest.mark.every_vllm


def test_every_binding_holds_in_the_installed_vllm():
    table = bindings.active()
    assert len(table) > 200
    bad = [p for b in table for p in bindings.problems(b)]
    assert not bad, "\n".join(bad)


def test_entries_are_unique_and_well_formed():
    for version in bindings.SUPPORTED_VLLM:
        keys = [b.key for b in bindings.active(version)]
        assert len(keys) == len(set(keys)), [k for k in keys if keys.count(k) > 1]
    for b in BINDINGS:
        assert b.kind in bindings.KINDS and b.module.startswith("vllm")
        assert (b.params is not None) == (b.kind in bindings.SIGNED), b
        assert set(b.versions) <= set(bindings.SUPPORTED_VLLM), b


def _listed(module: str, name: str) -> bool:
    """An import ``from module import name`` is listed: the name itself, one of its
    attributes, or (for a submodule) any entry of that submodule."""
    for m, n in (b.key for b in BINDINGS):
        if m == module and (n == name or n.startswith(name + ".")):
            return True
        if m == f"{module}.{name}":
            return True
    return False


def test_every_vllm_import_in_patches_is_listed():
    unlisted = []
    for path in sorted(PATCHES.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "vllm":
                unlisted += [f"{path.relative_to(PATCHES)}: from {node.module} import {a.name}"
                             for a in node.names if not _listed(node.module, a.name)]
    assert not unlisted, "\n".join(unlisted)


def _plugin_subclasses():
    from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    from vllm_sink.patches.scheduler.manager import StreamingSinkManager
    from vllm_sink.patches.spec import SinkWindowSpec

    return [(SinkWindowSpec, FullAttentionSpec), (StreamingSinkManager, FullAttentionManager)]


def test_every_override_is_listed():
    """Each method the plugin's subclasses define over one of their vLLM base's (written by
    hand: a dataclass's generated methods are vLLM's fields, not an override) is listed."""
    import dataclasses

    listed = {b.name for b in bindings.active() if b.kind == OVERRIDE}
    missing, found = [], 0
    for ours, base in _plugin_subclasses():
        generated = {"__init__", "__eq__", "__hash__", "__repr__", "__setattr__", "__delattr__",
                     "__getstate__", "__setstate__", "__replace__"} if dataclasses.is_dataclass(ours) else set()
        for name, value in vars(ours).items():
            fn = value.__func__ if isinstance(value, (classmethod, staticmethod)) else value
            if name in generated or not inspect.isfunction(fn) or not hasattr(base, name):
                continue
            found += 1
            if f"{base.__qualname__}.{name}" not in listed:
                missing.append(f"{ours.__name__}.{name} overrides {base.__qualname__}.{name}")
    assert found >= 12 and not missing, "\n".join(missing)


def test_every_wrap_is_installed_and_listed():
    """After the plugin installs, each listed class or module wrap of the plugin is in place
    (the table names no stale wrap)."""
    from vllm_sink import patches

    patches.install()
    not_wrapped = []
    for b in bindings.active():
        if b.kind != WRAP or b.side == bindings.BENCHMARKS:
            continue
        if not bindings.is_wrapped(bindings.function_of(bindings.resolve(b))):
            not_wrapped.append(f"{b.module}.{b.name}")
    assert not not_wrapped, not_wrapped


def test_wrap_once_refuses_a_symbol_not_in_the_table():
    from vllm.v1.core.kv_cache_manager import KVCacheManager

    before = inspect.getattr_static(KVCacheManager, "get_num_common_prefix_blocks")
    with pytest.raises(LookupError, match="not listed as a wrap"):
        bindings.wrap_once(KVCacheManager, "get_num_common_prefix_blocks", lambda orig: orig)
    assert inspect.getattr_static(KVCacheManager, "get_num_common_prefix_blocks") is before
    # A listed per-instance wrap is refused on the class (the kind must match too).
    from vllm.v1.worker.gpu_input_batch import InputBatch

    with pytest.raises(LookupError, match="not listed as a wrap"):
        bindings.wrap_once(InputBatch, "add_request", lambda orig: orig)


def test_instance_wrap_is_idempotent_and_leaves_the_class_alone():
    from vllm.v1.worker.gpu_input_batch import InputBatch

    batch = object.__new__(InputBatch)
    calls = []

    def make(orig):
        def add_request(request):
            calls.append(request)
            return -1
        return add_request

    assert bindings.wrap_once(batch, "add_request", make)
    assert not bindings.wrap_once(batch, "add_request", make)
    assert batch.add_request("r") == -1 and calls == ["r"]
    assert not bindings.is_wrapped(InputBatch.add_request)
    assert batch.add_request.__wrapped__.__func__ is InputBatch.add_request


def test_a_changed_signature_or_a_missing_symbol_is_caught(monkeypatch):
    from vllm.v1.core.kv_cache_manager import KVCacheManager

    entry = next(b for b in BINDINGS if b.name == "KVCacheManager.get_computed_blocks")
    assert not bindings.problems(entry)
    monkeypatch.setattr(KVCacheManager, "get_computed_blocks", lambda self, request, hashes: None)
    assert "parameters (self, request, hashes), recorded (self, request)" in bindings.problems(entry)[0]
    monkeypatch.delattr(KVCacheManager, "get_computed_blocks")
    assert "does not exist" in bindings.problems(entry)[0]
    renamed = bindings.Binding("scheduler", WRAP, "vllm.v1.core.kv_cache_manager", "KVCacheManager.get_cached_blocks",
                               "self, request")
    assert "does not exist" in bindings.problems(renamed)[0]
    instance = next(b for b in BINDINGS if b.kind == INSTANCE_WRAP)
    assert not bindings.problems(instance)


def test_an_unsupported_vllm_is_refused_at_start_up(monkeypatch):
    import vllm

    from vllm_sink import SinkConfigError, patches

    bindings.check_version("0.26.0+cpu")  # a build's local label is the same version
    bindings.check_version("0.32.0")
    monkeypatch.setattr(vllm, "__version__", "0.27.1")
    with pytest.raises(SinkConfigError, match=r"supports vLLM 0\.26\.0, 0\.32\.0; this is vLLM 0\.27\.1"):
        patches.install()

