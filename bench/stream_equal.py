"""Whether `--kv-streaming layerwise` gives the tokens `whole` gives, on any model and device
(the GPU check of issue 17: the CUDA path with its events and transfer stream). Starts
`pdserve serve --prefill 1 --decode 1` once per flag set on 127.0.0.1, sends the same greedy
prompts (one short, one long enough for several chunks), and compares the texts. `whole`
runs twice: the control (random weights make greedy ties, so a device that is not
deterministic run to run differs there too). Compare modes at the same chunk size
(`--max-num-batched-tokens`): chunked prefill with other chunk sizes gives other bf16 numerics.

    python -m bench.stream_equal --serve-args "--model DIR --load-format dummy" [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import urllib.request
from pathlib import Path

from bench.crossnode import start_server
from bench.sweep import wait_ready

PROMPTS = ["The capital of France is", "Once upon a time " * 300 + "In the end,"]


def complete(url: str, prompt: str) -> str:
    body = json.dumps({"prompt": prompt, "max_tokens": 24, "temperature": 0,
                       "ignore_eos": True}).encode()
    req = urllib.request.Request(f"{url}/v1/completions", body,
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        return json.loads(r.read())["choices"][0]["text"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.stream_equal", description=__doc__)
    p.add_argument("--serve-args", default="")
    p.add_argument("--modes", default="--kv-streaming whole;--kv-streaming whole;"
                   "--kv-streaming layerwise;"
                   "--kv-streaming layerwise --kv-stream-groups 16 --max-num-batched-tokens 512")
    p.add_argument("--out", default="")
    args = p.parse_args(argv)
    texts: dict[str, list[str]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in args.modes.split(";"):
            log = Path(tmp) / "serve.log"
            proc, url = start_server(None, "remote", log,
                                     shlex.split(args.serve_args) + shlex.split(mode))
            try:
                wait_ready(url, 300)
                texts[mode] = [complete(url, prompt) for prompt in PROMPTS]
            except (OSError, RuntimeError) as e:  # say why: the server's own last words
                print(f"{mode}: {type(e).__name__}: {e}\n--- serve log (tail) ---\n"
                      f"{log.read_text()[-4000:]}", flush=True)
                return 2
            finally:
                proc.send_signal(2)
                proc.wait(60)
            print(mode, texts[mode], flush=True)
    first = next(iter(texts.values()))
    equal = all(t == first for t in texts.values())
    print("identical" if equal else "DIFFERENT", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"texts": texts, "identical": equal}, indent=1))
    return 0 if equal else 1


if __name__ == "__main__":
    sys.exit(main())
