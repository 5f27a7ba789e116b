"""`pdserve` command line: generate, plan (and serve / bench / profile / plan cluster, in their
own modules).

Each subcommand's flags come from the config dataclasses (worker/args.py), so a flag has one
name, one default and one help text everywhere.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

from engine.config import ConfigError, EngineConfig
from engine.errors import EngineError
from worker.args import add_dataclass_args, dataclass_from_args


def _engine_parser(sub: argparse._SubParsersAction, name: str,
                   help_text: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help_text, description=help_text)
    add_dataclass_args(p, EngineConfig)
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pdserve",
                                     description="Disaggregated prefill/decode LLM serving")
    parser.add_argument("--log-level", default="INFO")
    sub = parser.add_subparsers(dest="command", required=True)

    g = _engine_parser(sub, "generate", "Generate completions locally (one continuous batch).")
    g.add_argument("--prompt", action="append", required=True,
                   help="Prompt text; repeat for a batch.")
    g.add_argument("--chat", action="store_true",
                   help="Wrap each prompt in the model's chat template.")
    g.add_argument("--system", default=None, help="System message (with --chat).")
    g.add_argument("--max-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--sample-seed", type=int, default=None, help="Per-request sampling seed.")
    g.add_argument("--ignore-eos", action="store_true")
    g.set_defaults(func=cmd_generate)

    p = _engine_parser(sub, "plan",
                       "Print the KV cache plan without loading weights or allocating it; "
                       "`plan cluster`: predict a cluster from a device profile.")
    p.set_defaults(func=cmd_plan)
    from deploy.plan_cli import add_plan_cluster_parser
    add_plan_cluster_parser(p)
    from deploy.profile_cli import add_profile_parser
    add_profile_parser(sub)

    from deploy.serve_cli import add_serve_parser
    add_serve_parser(sub)
    from deploy.status_cli import add_status_parsers
    add_status_parsers(sub)
    from deploy.bench_cli import add_bench_parser
    add_bench_parser(sub)
    return parser


def cmd_plan(args: argparse.Namespace) -> int:
    from engine.checkpoint import read_model_config
    from engine.memory_plan import plan_kv_cache

    config = dataclass_from_args(EngineConfig, args)
    print(plan_kv_cache(read_model_config(config.model), config).line())
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from engine.llm_engine import LLMEngine
    from engine.sampling_params import SamplingParams

    config = dataclass_from_args(EngineConfig, args)
    engine = LLMEngine.from_config(config)
    tok = engine.tokenizer
    prompts = []
    for text in args.prompt:
        if args.chat:
            messages = ([{"role": "system", "content": args.system}] if args.system else [])
            text = tok.apply_chat_template([*messages, {"role": "user", "content": text}])
        prompts.append(tok.encode(text))
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                            top_p=args.top_p, top_k=args.top_k, seed=args.sample_seed,
                            ignore_eos=args.ignore_eos)
    t0 = time.perf_counter()
    try:
        seqs = engine.generate(prompts, params)
    finally:
        engine.close()
    elapsed = time.perf_counter() - t0
    for i, seq in enumerate(seqs):
        if len(seqs) > 1:
            print(f"--- [{i}] ({seq.finish_reason.value if seq.finish_reason else '?'})")
        print(tok.decode(seq.output_ids))
    num_out = sum(s.num_output_tokens for s in seqs)
    logging.getLogger("pdserve").info("%d tokens in %.2f s (%.1f tok/s)", num_out, elapsed,
                                      num_out / elapsed)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except (ConfigError, EngineError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
