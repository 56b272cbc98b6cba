#!/usr/bin/env python
"""Sweep vLLM's text-generation architectures through the sink policy's start-up checks.

For every architecture in vLLM's model registry that generates text
(``vllm.model_executor.models.registry._TEXT_GENERATION_MODELS``, plus the text models vLLM
serves through its Transformers modeling backend, ``_TRANSFORMERS_SUPPORTED_MODELS``), the
sweep builds a config, makes vLLM's own ``ModelConfig`` of it, and runs the plugin's
start-up check on it (``patches/refusals.py``: ``check_model``, which ends with the
architecture allow-list ``CHECKED_ARCHITECTURES``). The outcome is either

* ``served``: the check passes, and the test that matches the architecture against the
  plain-PyTorch reference is named (the config swept is that test's own tiny model); or
* ``refused``: the ``SinkConfigError`` the engine would raise at start-up.

Configs: a checked architecture gets its test's config (``tests/family_models.py``,
SmolLM2 for Llama; a same-class alias gets its tested name's config, renamed); any other
gets transformers' (or vLLM's own) default config for its model type, with its
architecture name. No weights are built: the refusal comes before vLLM loads any. Where no
config can be built (the model type exists only as remote code, or vLLM cannot inspect the
class on this build), the outcome is the allow-list's own answer for the name
(``check_architecture``), labelled as such. An architecture that is not on the allow-list
is refused whatever its config: every path through ``check_model`` either refuses for a
structural reason or ends at the allow-list.

Writes ``docs/families.json`` and ``docs/families.md`` (a vLLM upgrade re-runs it);
``--check`` compares instead of writing. Takes a minute or two on two CPU cores (vLLM's
model classes are inspected in this process, not one subprocess each, and cached by vLLM
under ``~/.cache/vllm/modelinfos``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_VLLM = "0.26.0"  # its page is docs/families.md; another version's, docs/families-vllm-VERSION.md


def doc_paths(vllm_version: str) -> tuple[Path, Path]:
    """The markdown page and JSON of the sweep for ``vllm_version``."""
    v = vllm_version.split("+", 1)[0]
    stem = "families" if v == DEFAULT_VLLM else f"families-vllm-{v}"
    return ROOT / "docs" / f"{stem}.md", ROOT / "docs" / f"{stem}.json"


# Model types whose config class is vLLM's own (vllm.transformers_utils.config), for
# architectures whose name transformers does not know.
VLLM_CONFIG_TYPES = {
    "ArcticForCausalLM": "arctic",
    "ChatGLMModel": "chatglm",
    "ChatGLMForConditionalGeneration": "chatglm",
    "Step3TextForCausalLM": "step3_text",
    "Step3p5ForCausalLM": "step3p5",
    "HCXVisionForCausalLM": "hyperclovax_vlm",
}

# Refusal message -> reason, first match wins (the order of check_model's checks).
REASONS = [
    ("runs as a", "not a text-generation runner"),
    ("encoder-decoder", "encoder-decoder"),
    ("multi-head latent attention", "multi-head latent attention (MLA)"),
    ("hybrid (Mamba", "hybrid (Mamba / linear attention)"),
    ("has no attention layers", "attention-free"),
    ("uses M-RoPE", "M-RoPE"),
    ("is multimodal", "multimodal"),
    ("sliding-window or local attention", "sliding-window / local attention layers of its own"),
    ("uses ALiBi in an architecture", "ALiBi, architecture not checked against the reference"),
    ("no rotary position embeddings (RoPE) and no ALiBi", "config names neither RoPE nor ALiBi"),
    ("rope_type=", "rotary embedding that is not a pure rotation"),
    ("no max_position_embeddings", "no max_position_embeddings"),
    ("is not checked against the sink policy's reference", "architecture not checked against the reference"),
]


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Run the sink policy's start-up checks over vLLM's text-generation registry "
        "and write the table (docs/families.md, docs/families.json).",
    )
    p.add_argument("--arch", action="append", default=[], metavar="NAME",
                   help="sweep only these architectures (repeatable); prints, writes nothing")
    p.add_argument("--check", action="store_true",
                   help="compare with docs/families.json instead of writing; exit 1 if they differ")
    p.add_argument("--md", type=Path, help="markdown page to write (default: docs/families.md for vLLM "
                   f"{DEFAULT_VLLM}, docs/families-vllm-VERSION.md for another)")
    p.add_argument("--json", type=Path, help="JSON to write (default: beside the page)")
    p.add_argument("-v", "--verbose", action="store_true", help="print every outcome as it comes")
    return p.parse_args(argv)


def quiet():
    # vLLM logs, with a traceback, each model class it cannot import (e.g. a missing optional
    # package); the sweep records those as its own rows.
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "CRITICAL")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.pop("VLLMSINK_ALLOW_UNCHECKED", None)  # the sweep reports the policy as shipped
    import warnings

    warnings.filterwarnings("ignore")


def registry_rows():
    """(architecture, vLLM implementation, its registry key) for every text-generation
    architecture, in registry order."""
    from vllm.model_executor.models import registry

    rows = [(arch, f"{mod}.{cls}", (mod, cls)) for arch, (mod, cls) in registry._TEXT_GENERATION_MODELS.items()]
    for arch, (mod, cls) in registry._TRANSFORMERS_SUPPORTED_MODELS.items():
        if cls == "TransformersForCausalLM":
            rows.append((arch, f"Transformers backend ({cls})", (mod, cls)))
    return rows


def inspect_in_process():
    """vLLM inspects each lazily registered model class in a fresh subprocess (to keep CUDA
    out of the parent); on this CPU sweep that would be a Python start per architecture."""
    from vllm.model_executor.models import registry

    registry._run_in_subprocess = lambda fn: fn()


def model_types():
    """Architecture class name -> model type, from every transformers auto mapping."""
    from transformers.models.auto import modeling_auto

    candidates = {}
    for attr in sorted(dir(modeling_auto)):
        if attr.startswith("MODEL_") and attr.endswith("_MAPPING_NAMES"):
            for mt, cls in getattr(modeling_auto, attr).items():
                for c in cls if isinstance(cls, (list, tuple)) else (cls,):
                    candidates.setdefault(c, []).append(mt)

    def best(cls, types):  # GPT2LMHeadModel: gpt2, not gpt-sw3, which reuses the class
        squash = cls.lower()
        return next((t for t in types if t.replace("-", "").replace("_", "") in squash), types[0])

    return {cls: best(cls, types) for cls, types in candidates.items()}


def tested_configs():
    """Tested architecture -> (label, config dir or config object) of the test that checks it."""
    sys.path.insert(0, str(ROOT / "tests"))
    import family_models
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from vllm_sink import assets

    out = {"LlamaForCausalLM": ("SmolLM2-135M-Instruct (tests/test_engine_reference.py)", assets.model_dir())}
    for name in list(family_models.FAMILIES) + list(family_models.ALIBI_FAMILIES):
        cfg = family_models.config_of(name)
        arch = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[cfg.model_type]
        out.setdefault(arch, (f"tests/family_models.py `{name}`", cfg))
    return out


class NotConstructible(Exception):
    pass


def build_config(arch, key, rows, names, tested):
    """(label, config object or directory) for ``arch``; raises NotConstructible."""
    from vllm_sink.allowlist import SAME_CLASS_ALIASES

    if arch in tested:
        return tested[arch]
    if arch in SAME_CLASS_ALIASES:
        label, cfg = tested[SAME_CLASS_ALIASES[arch]]
        return f"{label}, named {arch}", cfg
    if key[1] == "TransformersForCausalLM":
        same = []
    else:  # other registry names of the same vLLM class (e.g. MPTForCausalLM, MptForCausalLM)
        same = [a for a, _, k in rows if k == key and a != arch]
    lower = {n.lower(): mt for n, mt in names.items()}
    mt = (names.get(arch) or next((names[a] for a in same if a in names), None) or lower.get(arch.lower())
          or names.get(key[1]) or VLLM_CONFIG_TYPES.get(arch))
    if mt is None:
        raise NotConstructible("no transformers or vLLM config class for it: its model type is remote code")
    from transformers import CONFIG_MAPPING
    from vllm.transformers_utils.config import _CONFIG_REGISTRY

    source = "vLLM" if mt in _CONFIG_REGISTRY else "transformers"
    try:
        cls = _CONFIG_REGISTRY[mt] if mt in _CONFIG_REGISTRY else CONFIG_MAPPING[mt]
        cfg = cls()
    except Exception as exc:  # noqa: BLE001 - recorded as the reason
        raise NotConstructible(f"{source}'s {mt} config: {type(exc).__name__}: {first_line(exc)}") from exc
    return f"{source} `{mt}` defaults", cfg


def first_line(exc) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def model_config_of(arch, cfg, tmp: Path):
    from vllm.config import ModelConfig

    from vllm_sink import assets

    if isinstance(cfg, Path):
        path = cfg
        if json.loads((cfg / "config.json").read_text())["architectures"] != [arch]:
            data = json.loads((cfg / "config.json").read_text())
            path = tmp / arch
            path.mkdir()
            (path / "config.json").write_text(json.dumps({**data, "architectures": [arch]}))
    else:
        cfg.architectures = [arch]
        path = tmp / arch
        cfg.save_pretrained(path)
    return path, ModelConfig(model=str(path), tokenizer=str(assets.model_dir()), dtype="float32")


def model_config_failure(exc, key) -> str:
    """Why vLLM's ModelConfig could not be built; when it could not inspect the model class,
    the import error behind it (e.g. an optional package this build lacks)."""
    why = first_line(exc)
    if hasattr(exc, "errors"):  # pydantic's ValidationError: the first error's own text
        try:
            why = str(exc.errors()[0].get("msg", why))
        except Exception:  # noqa: BLE001
            pass
    if "failed to be inspected" in why:
        import importlib

        module = key[0] if "." in key[0] else f"vllm.model_executor.models.{key[0]}"
        try:
            importlib.import_module(module)
        except Exception as imp:  # noqa: BLE001
            return f"vLLM cannot import its class on this build ({type(imp).__name__}: {first_line(imp)})"
    return f"vLLM's ModelConfig: {type(exc).__name__}: {why[:160]}"


def reason_of(message: str) -> str:
    return next((why for pattern, why in REASONS if pattern in message), "other")


def sweep_one(arch, impl, key, rows, names, tested, tmp):
    from vllm_sink.config import SinkConfigError
    from vllm_sink.allowlist import CHECKED_ARCHITECTURES
    from vllm_sink.patches.refusals import architecture_of, check_architecture, check_model

    row = dict(architecture=arch, implementation=impl)
    try:
        label, cfg = build_config(arch, key, rows, names, tested)
        row["config"] = label
        try:
            path, mc = model_config_of(arch, cfg, tmp)
        except Exception as exc:  # noqa: BLE001
            raise NotConstructible(model_config_failure(exc, key)) from exc
        row["resolved"] = architecture_of(mc)
        try:
            check_model(mc)
        except SinkConfigError as exc:
            msg = str(exc).replace(str(path), arch)
            return {**row, "outcome": "refused", "reason": reason_of(msg), "message": msg}
        resolved = row["resolved"]
        return {**row, "outcome": "served", "checked_by": CHECKED_ARCHITECTURES.get(resolved, "NOT CHECKED")}
    except NotConstructible as why:
        row["config"] = f"not constructible: {why}"
        try:
            check_architecture(arch)
        except SinkConfigError as exc:
            return {**row, "outcome": "refused", "reason": "architecture not checked against the reference "
                    "(static: config not constructible)", "message": str(exc), "static": True}
        return {**row, "outcome": "served", "checked_by": CHECKED_ARCHITECTURES[arch], "static": True}


def clause(message: str) -> str:
    """The message up to its first '; ' (the reason; the rest names the fix)."""
    return message.split("; ")[0]


def counts_of(results):
    served = [r for r in results if r["outcome"] == "served"]
    refused = [r for r in results if r["outcome"] == "refused"]
    by_reason = {}
    for r in refused:
        by_reason[r["reason"]] = by_reason.get(r["reason"], 0) + 1
    return dict(total=len(results), served=len(served), refused=len(refused),
                refused_by_reason=dict(sorted(by_reason.items(), key=lambda kv: (-kv[1], kv[0]))),
                refused_static=sum(1 for r in refused if r.get("static")))


def markdown(results, counts, versions):
    from vllm_sink.allowlist import (
        ALLOW_UNCHECKED_ENV,
        CHECKED_ARCHITECTURES,
        SAME_CLASS_ALIASES,
        TESTED_ARCHITECTURES,
    )

    esc = lambda s: s.replace("|", "/")  # noqa: E731
    lines = [
        "# Model families: what the sink policy serves",
        "",
        "<!-- Generated by `python scripts/registry_sweep.py` from vLLM's registry and",
        "     patches/refusals.py; do not edit by hand. -->",
        "",
        "The sink policy serves an architecture only when a test matches its output, streaming past",
        "the window, against an independent plain-PyTorch StreamingLLM reference",
        "(`tests/reference.py`, `tests/reference_families.py`). Every other architecture is refused",
        "at start-up with a `SinkConfigError` naming the reason: a structural one where the",
        "policy cannot work (MLA, hybrid, sliding-window layers, no RoPE or ALiBi, a rotary that",
        "is not a pure rotation, ...), otherwise the architecture allow-list",
        "(`CHECKED_ARCHITECTURES` in `vllm_sink/allowlist.py`), so nothing runs unverified. The",
        f"allow-list can be bypassed knowingly with `{ALLOW_UNCHECKED_ENV}=1` (the engine logs a",
        "warning; every structural check still applies).",
        "",
        "## The allow-list",
        "",
        "| architecture | checked by |",
        "|---|---|",
    ]
    import vllm

    from vllm_sink.allowlist import checked_on

    served = checked_on(vllm.__version__)
    tested = [arch for arch in TESTED_ARCHITECTURES if arch in served]
    for arch in tested:
        lines.append(f"| `{arch}` | {esc(TESTED_ARCHITECTURES[arch])} |")
    for alias, target in SAME_CLASS_ALIASES.items():
        if alias in served:
            lines.append(f"| `{alias}` | same vLLM class as `{target}` (served on its test, not one of its own) |")
    gone = [arch for arch in CHECKED_ARCHITECTURES if arch not in served]
    if gone:
        lines += ["", f"Checked on another vLLM version, but not served by vLLM {vllm.__version__} with the class "
                  "its test checked (dropped from its registry, or moved to its Transformers modeling "
                  f"backend, which is refused): {', '.join(f'`{a}`' for a in gone)}."]
    lines += [
        "",
        f"## The registry sweep ({versions})",
        "",
        f"{counts['total']} text-generation architectures: **{counts['served']} served, each checked by a "
        f"named test** ({len(tested)} tested, {counts['served'] - len(tested)} "
        f"same-class aliases), **{counts['refused']} refused at start-up**:",
        "",
        "| refused because | architectures |",
        "|---|---|",
    ]
    for why, n in counts["refused_by_reason"].items():
        lines.append(f"| {why} | {n} |")
    lines += [
        "",
        "How each row is derived: vLLM's own `ModelConfig` is built from a config for the",
        "architecture and the plugin's start-up check (`check_model`) runs on it, as the engine",
        "does before any process starts. A checked architecture is swept with the config of the",
        "model its test serves (SmolLM2-135M for Llama; for the others the tiny 2-layer models of",
        "`tests/family_models.py`, which the tests load with random weights; a same-class alias",
        "with its class's config, renamed); any other with its model type's default config",
        "(transformers', or vLLM's own config class), renamed to the architecture. No weights are",
        "built: the refusal comes before vLLM loads any. Where no config can be built",
        f"({counts['refused_static']} rows: the model type exists only as remote code, vLLM cannot import",
        "the class on this build, or the default config does not pass vLLM's own validation), the",
        "row is the allow-list's answer for the name (`check_architecture`), marked *static*. A",
        "name off the allow-list is refused whatever its config: every path through `check_model`",
        "ends either in a structural refusal or at the allow-list. The engine checks more on the",
        "worker once the model is built (its rotary embedding is a pure rotation, every layer is",
        "plain full attention, the attention backend); for the served rows the named test shows",
        "those pass and the output matches the reference.",
        "",
        "Rows with a structural reason are also off the allow-list; the reason shown is the first",
        "one the engine reports.",
        "",
        "| architecture | vLLM implementation | config swept | outcome |",
        "|---|---|---|---|",
    ]
    for r in results:
        if r["outcome"] == "served":
            out = f"**served**, checked by {esc(r['checked_by'])}"
        else:
            out = "refused" + (" (*static*)" if r.get("static") else "") + f": {esc(clause(r['message']))}"
        config = r["config"] if len(r["config"]) <= 120 else r["config"][:117] + "..."
        lines.append(f"| `{r['architecture']}` | `{r['implementation']}` | {esc(config)} | {out} |")
    lines += [
        "",
        f"Re-run after a vLLM upgrade: `python scripts/registry_sweep.py` (writes this page and",
        "`docs/families.json`, with every full message); `--check` compares instead of writing.",
        "",
    ]
    assert set(served) <= {r["architecture"] for r in results}
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    quiet()
    t0 = time.time()
    import transformers
    import vllm
    from tqdm import tqdm

    md, js = doc_paths(vllm.__version__)
    args.md, args.json = args.md or md, args.json or js
    inspect_in_process()
    rows = registry_rows()
    if args.arch:
        unknown = set(args.arch) - {a for a, _, _ in rows}
        if unknown:
            print(f"not text-generation architectures of vLLM {vllm.__version__}: {sorted(unknown)}", file=sys.stderr)
            return 2
    names, tested = model_types(), tested_configs()
    todo = [r for r in rows if not args.arch or r[0] in args.arch]
    results = []
    with tempfile.TemporaryDirectory(prefix="registry-sweep-") as tmp, \
            tqdm(todo, unit="arch", desc="sweep", file=sys.stderr) as bar:
        for arch, impl, key in bar:
            bar.set_postfix_str(arch)
            r = sweep_one(arch, impl, key, rows, names, tested, Path(tmp))
            results.append(r)
            if args.verbose or args.arch:
                tqdm.write(f"{arch}: {r['outcome']}: {r.get('checked_by') or clause(r['message'])}"
                           + (f"  [config: {r['config']}]" if args.verbose else ""), file=sys.stderr)
    counts = counts_of(results)
    versions = f"vLLM {vllm.__version__}, transformers {transformers.__version__}"
    print(json.dumps(counts, indent=1))
    print(f"{len(results)} architectures in {time.time() - t0:.0f} s", file=sys.stderr)
    bad = [r["architecture"] for r in results if r["outcome"] == "served" and r["checked_by"] == "NOT CHECKED"]
    if bad:
        print(f"served without a check (a bug): {bad}", file=sys.stderr)
        return 1
    if args.arch:
        return 0
    data = dict(versions=versions, counts=counts, results=results)
    text = json.dumps(data, indent=1) + "\n"
    page = markdown(results, counts, versions)
    if args.check:
        same = args.json.exists() and args.json.read_text() == text and args.md.exists() and args.md.read_text() == page
        print("up to date" if same else f"{args.json} / {args.md} differ from this vLLM's registry: re-run "
              "scripts/registry_sweep.py", file=sys.stderr)
        return 0 if same else 1
    args.json.write_text(text)
    args.md.write_text(page)
    print(f"wrote {args.md.relative_to(ROOT) if args.md.is_relative_to(ROOT) else args.md} and "
          f"{args.json.relative_to(ROOT) if args.json.is_relative_to(ROOT) else args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
