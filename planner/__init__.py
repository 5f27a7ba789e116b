"""The capacity planner: a serving simulator fed by a profile measured on one device.

Contract:
- Pure Python over plain data: it imports no torch, no sockets, no ZMQ (an import-linter
  contract in pyproject.toml). It may import `proxy.cost_model` and `proxy.placement`, the pure
  step-time model and placement rule the proxy runs, so the planner places requests exactly as
  a running cluster would; nothing else above `engine/`'s torch-free modules.
- Input: a `Profile` (profile.py: step times measured by `pdserve profile`), a list of
  `SimRequest`s (arrival time, prompt and output tokens) and a `ClusterSpec` (prefill and
  decode workers, placement mode, SLOs, engine limits). Output: one `RequestOutcome` per request
  (first-token and finish times), from which search.py computes attainment, goodput and
  percentiles exactly as `pdserve bench` does from a measured run.
- Deterministic: the same inputs give the same outcomes (no clock, no global random state).

Modules:
    profile     the profile's schema (JSON) and the step-time model interpolated from it
    workload    requests: Poisson arrivals over length distributions, or recorded ones
    servers     the prefill and decode worker models (token budget, chunking, KV capacity)
    warmup      the steps of a worker's start-up warm-up (worker/warmup.py's rounds), which
                the simulator's online cost models see first
    simulator   the discrete-event loop: routing, placement, reservation, transfer
    search      every xPyD split and colocated replicas over a rate sweep; goodput; the
                recommendation and its `pdserve serve` command
    report      text and JSON rendering of a search
"""
