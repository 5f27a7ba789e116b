"""Write a model directory for `--load-format dummy` benchmarks: a Llama-family config.json of a
named shape plus SmolLM2's tokenizer and chat template (so the proxy can tokenize), no weights.

    python -m bench.make_dummy_model --preset llama3-8b --out /tmp/llama3-8b-shape
    pdserve serve --model /tmp/llama3-8b-shape --load-format dummy ...

The vocabulary is SmolLM2's (49152 tokens) so every sampled id decodes; the rest of the shape
is the preset's. Weights are drawn on the device by the engine at start-up.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from engine.checkpoint import resolve_model_path
from engine.tokenizer import Tokenizer

PRESETS: dict[str, dict[str, int | float]] = {
    "llama3-8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                  "num_attention_heads": 32, "num_key_value_heads": 8, "rope_theta": 500000.0,
                  "max_position_embeddings": 8192},
    "llama3-1b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
                  "num_attention_heads": 32, "num_key_value_heads": 8, "rope_theta": 500000.0,
                  "max_position_embeddings": 8192},
}


def write_dummy_model(preset: str, out: Path) -> Path:
    tok = Tokenizer.from_gguf(resolve_model_path("smollm2"))
    out.mkdir(parents=True, exist_ok=True)
    tok.backend.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": tok.chat_template, "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>"}))
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
              "vocab_size": tok.vocab_size, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
              "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16", **PRESETS[preset]}
    (out / "config.json").write_text(json.dumps(config, indent=1))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="llama3-8b")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    print(write_dummy_model(args.preset, args.out))


if __name__ == "__main__":
    main()
