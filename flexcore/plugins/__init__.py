"""Plugins: separate processes speaking one versioned protocol, and ETL pipelines.

- `protocol`: the handshake line and the length-prefixed msgpack RPC frames.
- `sdk`: ``serve(plugin)`` for plugins written in Python.
- `host`: discovery (entry points ``flexcore.plugins`` and ``--plugins-dir``), child
  processes with handshake and call timeouts, restart with backoff, clean shutdown.
- `builtin`: the shipped plugins ``postgres-extractor``, ``json-transformer``,
  ``api-loader``.
- `runner`: the leader-side `PipelineRunner` (extract -> transform -> load -> commit
  the replicated checkpoint, batch by batch); `service`: the API/library side.

The replicated half (pipeline definitions, runs, checkpoints) is
`flexcore.statemachine.pipelines`.
"""
