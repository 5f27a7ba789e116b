"""The proxy: pdserve's OpenAI-compatible HTTP front end.

It validates requests, applies the chat template, routes each request to a decode worker (which
reserves blocks) and a prefill worker, streams tokens back as text, and exports metrics. It
never runs the model and never touches KV cache bytes.

Modules:
    openai_api   OpenAI request/response/chunk models; `to_sampling()` -> `SamplingParams`
    errors       OpenAI-shaped errors (`ApiError`) and FastAPI exception handlers
    detokenizer  incremental detokenization that never emits broken UTF-8
    stop         stop strings over streamed text
    sse          server-sent-events framing
    metrics      `pdserve:` Prometheus metrics (one registry per instance)
    router       worker snapshots and routing policies (round-robin, least-loaded, prefix-aware)
    limits       HTTP limits (`HttpLimits` flags) and the body-size middleware (413)
    http_server  uvicorn settings and the h11 protocol with header/body timeouts
    prompts      prompt caps, chat template + tokenizer in a thread pool, special-token policy
    disconnect   non-streaming requests cancelled when their client leaves
    structured   response_format / guided_* -> one compiled-checked `GuidedDecoding`
    tools        tools / tool_choice: prompt format (Hermes when the template has none), forced
                 call grammar; tool_parser: calls out of the output, whole or streamed
"""
