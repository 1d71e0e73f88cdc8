"""The admin API: `create_app(service)` builds the aiohttp application over a NodeService."""

from flexcore.api.app import SERVICE_KEY, create_app

__all__ = ["SERVICE_KEY", "create_app"]
