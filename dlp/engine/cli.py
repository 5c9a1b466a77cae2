"""`dlp generate PROMPT` and `dlp bench fusion` (no torch import at module import time)."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

from dlp.errors import DlpError


def register(subparsers: argparse._SubParsersAction) -> None:
    gen = subparsers.add_parser(
        "generate",
        help="generate text with the base model and an optional adapter mix",
        description="Generate with the embedded default (or --model) and a weighted adapter "
        "mix; tokens stream to stdout.",
    )
    gen.add_argument("prompt", help="the prompt (or the user message with --chat)")
    gen.add_argument(
        "--adapters",
        default="",
        help="mix as name=weight,... (weights renormalised); empty = base model",
    )
    gen.add_argument(
        "--adapter-root",
        default=None,
        help="directory of PEFT adapter dirs (default: the dlp cache's adapters)",
    )
    gen.add_argument(
        "--model", default=None, help="transformers checkpoint dir (default: embedded)"
    )
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    gen.add_argument("--chat", action="store_true", help="apply the chat template")
    gen.add_argument("--device", default="cpu")
    gen.add_argument("--json", action="store_true", help="print the result as JSON at the end")
    gen.set_defaults(func=_generate)

    from dlp.bench_cli import bench_subparsers

    bench = bench_subparsers(subparsers)
    if "fusion" not in bench.choices:
        fusion = bench.add_parser(
            "fusion",
            help="engine vs transformers/PEFT fusion benchmark (JSON + PNG)",
            description="Variants (a)-(g) of issue 4 side by side; GPU shapes qwen2-1.5b and "
            "llama3-8b with random bf16 weights, or --device cpu with the embedded default.",
        )
        from dlp.engine.bench_args import add_arguments

        add_arguments(fusion)
        fusion.set_defaults(func=_bench_fusion)


def parse_mix(text: str):
    from dlp.routing.mix import AdapterMix

    text = text.strip()
    if not text:
        return AdapterMix.base()
    weights: dict[str, float] = {}
    for part in text.split(","):
        name, sep, weight = part.partition("=")
        name = name.strip()
        try:
            weights[name] = float(weight) if sep else 1.0
        except ValueError:
            raise DlpError(f"--adapters: weight of {name!r} is not a number: {weight!r}") from None
    return AdapterMix.from_weights(weights)


def _generate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from dlp.engine.config import EngineConfig
    from dlp.engine.engine import Engine
    from dlp.engine.types import GenerationRequest, SamplingParams
    from dlp.paths import adapters_dir, cache_dir

    mix = parse_mix(args.adapters)
    sampling = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        stop=tuple(args.stop),
    )
    sampling.validate()
    root = args.adapter_root
    if root is None and not mix.is_base:
        root = str(adapters_dir(cache_dir()))
    if root is not None and not Path(root).is_dir():
        raise DlpError(f"--adapter-root: {root} is not a directory")
    config = EngineConfig(
        model_path=args.model,
        device=args.device,
        max_batch=1,
        max_seq_len=2048,
        adapter_root=root,
        pool_slots=max(4, len(mix)),
    )
    if args.chat:
        request = GenerationRequest(
            request_id="cli",
            mix=mix,
            sampling=sampling,
            messages=({"role": "user", "content": args.prompt},),
        )
    else:
        request = GenerationRequest(
            request_id="cli", mix=mix, sampling=sampling, prompt=args.prompt
        )

    async def run():
        engine = Engine.from_config(config)
        async with engine:
            chunks = []
            async for chunk in engine.generate_stream(request):
                chunks.append(chunk)
                if not args.json:
                    sys.stdout.write(chunk.text)
                    sys.stdout.flush()
            return engine.result_of_chunks(chunks)

    result = asyncio.run(run())
    if args.json:
        print(
            json.dumps(
                {
                    "text": result.text,
                    "mix": result.mix.as_dict(),
                    "finish_reason": result.finish_reason,
                    "prompt_tokens": result.prompt_tokens,
                    "completion_tokens": result.completion_tokens,
                }
            )
        )
    else:
        print()
    return 0


def _bench_fusion(args: argparse.Namespace) -> int:
    from dlp.engine.bench_fusion import cli_main

    args.command_line = "dlp bench fusion " + " ".join(sys.argv[3:])
    return cli_main(args)
