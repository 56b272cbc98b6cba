"""The stock ``vllm serve`` argument parser, wherever the installed vLLM keeps it (0.26.0:
``vllm.entrypoints.openai.cli_args``; 0.32.0: ``vllm.entrypoints.launchers.cli_args``)."""

from __future__ import annotations

import importlib


def serve_parser():
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    for module in ("vllm.entrypoints.openai.cli_args", "vllm.entrypoints.launchers.cli_args"):
        try:
            make_arg_parser = importlib.import_module(module).make_arg_parser
        except ModuleNotFoundError:
            continue
        return make_arg_parser(FlexibleArgumentParser())
    raise ModuleNotFoundError("vLLM's make_arg_parser")
