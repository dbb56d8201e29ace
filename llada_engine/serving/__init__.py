"""The OpenAI-compatible HTTP server on the continuous-batching Engine (`llada-engine serve`): FastAPI and
uvicorn, imported only by that command, never by `import llada_engine`.

    server.py    the command: load the model, start the engine's loop, serve until SIGINT/SIGTERM
    app.py       the routes: /v1/completions, /v1/chat/completions (streamed or not), /v1/models, /health, /metrics
    protocol.py  the OpenAI request bodies, checked field by field; the OpenAI error object
    text.py      detokenisation as blocks commit, and stop strings
    metrics.py   the Prometheus metrics
"""
