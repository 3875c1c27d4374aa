"""The HTTP gateway: job API, SSE delivery, health."""

from conveyor.gateway.app import create_app
from conveyor.gateway.core import GatewayLimits

__all__ = ["GatewayLimits", "create_app"]
