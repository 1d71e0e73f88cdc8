"""The plugins FlexCore ships, each a module run as ``python -m`` by the host and
registered as an entry point in the ``flexcore.plugins`` group:

- ``postgres-extractor`` (`postgres_extractor`): incremental reads through SQLAlchemy.
- ``json-transformer`` (`json_transformer`): a declarative JMESPath mapping and filter.
- ``api-loader`` (`api_loader`): batched HTTP POST with idempotency keys and retries.

Execute contracts (``params`` -> result):

- extractor: ``{checkpoint: cursor | nil}`` -> ``{rows: [map], cursor: last cursor |
  nil, done: bool}`` (``done``: the source has nothing after ``cursor`` right now).
- transformer: ``{rows}`` -> ``{rows}``.
- loader: ``{rows, key, meta?}`` -> ``{loaded: int, attempts: int}``.
"""
