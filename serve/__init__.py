"""An OpenAI-compatible HTTP server for trained runs (`make serve RUN=runs/<name>`, docs/serving.md).

One job per module, lower ones first:
    loader.py     a run directory -> its models (single model, or one name per agent: own weights or a
                  LoRA adapter over a shared base), with tokenizers; through trainer/ and launch/export
    protocol.py   the OpenAI request bodies checked and turned into rows to generate; the error contract
    chat.py       the chat template of each model style
    text.py       one choice's tokens -> text deltas: incremental detokenisation and stop strings
    scheduler.py  the continuous-batching loop over model.generate.DecodeEngine in one background thread
    job.py        one HTTP request in flight: its rows, their text, usage, timings, cancellation
    metrics.py    Prometheus counters and the one-line JSON request log
    app.py        the Starlette ASGI app: routes, streaming, disconnects, errors
    ort.py        `--engine onnxruntime`: an ONNX export behind the scheduler's engine interface
    procs.py      child processes: stop them by a deadline, wait for a server's /health
    routing.py    which replica takes a request: least-loaded, cache-aware with a load cap, round-robin
    router.py     `--replicas N`: the replica processes and the router app in front of them
    tp.py         `--tp N`: the models sharded over N ranks, rank 0's engine calls broadcast and followed
    tp_ranks.py   `--tp N`: the other ranks' processes, the process group, a lost rank, shutdown
    cli.py        `python -m serve RUN [--host --port --replicas --tp ...]`: load, build, run under uvicorn
Nothing below serve/ imports it.
"""
