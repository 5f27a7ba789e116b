"""Load generation and benchmarks for OpenAI-compatible servers (pdserve, vLLM, SGLang, ...).

- `bench/datasets.py`: the requests of a workload (synthetic lengths, multi-turn chat with prefix
  reuse, ShareGPT JSON), reproducible from a seed.
- `bench/loadgen.py`: sends them (Poisson arrivals or fixed concurrency), streams SSE with httpx
  and times every chunk; one `RequestResult` per request.
- `bench/metrics.py`: TTFT / TPOT / ITL / e2e statistics, throughput, SLO attainment, goodput.
- `bench/report.py`: the tables, the JSON result file and the PNG plots.
- `bench/sweep.py`: one workload at several rates against several server configurations
  (given as URLs or started here as `pdserve serve` subprocesses).

Benchmarks are not tests: nothing here asserts; the CLI is `pdserve bench` (deploy/bench_cli.py).
The load generator never imports the serving code except, lazily, `engine.tokenizer` to size
prompts in tokens. Micro-benchmarks of the components live beside it (bench/engine.py,
bench/transfer.py); results go to bench/results/.
"""
