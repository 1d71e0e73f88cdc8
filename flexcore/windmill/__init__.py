"""Windmill integration: the HTTP client, the leader-side runner and the run service.

- `client`: aiohttp client for the Windmill endpoints FlexCore uses, typed errors,
  retries (5xx and connection errors only).
- `runner`: `WorkflowRunner`, which submits, polls and routes while this node leads.
- `routing`: what a routing rule matches (type glob + JMESPath condition) and the args
  it renders.
- `service`: `WorkflowService`, behind ``/v1/workflows``.

The replicated state (runs, rules, routing cursor) is
`flexcore.statemachine.workflows`; the stand-in used by the tests is
`flexcore.testing.windmill`.
"""

from .client import (
    JobAlreadyExists,
    ResultMaybe,
    WindmillBadRequest,
    WindmillClient,
    WindmillError,
    WindmillForbidden,
    WindmillNotFound,
    WindmillServerError,
    WindmillSettings,
    WindmillUnauthorized,
    WindmillUnavailable,
)

__all__ = [
    "JobAlreadyExists",
    "ResultMaybe",
    "WindmillBadRequest",
    "WindmillClient",
    "WindmillError",
    "WindmillForbidden",
    "WindmillNotFound",
    "WindmillServerError",
    "WindmillSettings",
    "WindmillUnauthorized",
    "WindmillUnavailable",
]
