"""The HTTP gateway: job API, SSE delivery, health."""

from conveyor.gateway.app import GatewayLimits, create_app

__all__ = ["GatewayLimits", "create_app"]
