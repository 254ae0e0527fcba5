"""The federation service: an aiohttp HTTPS API (mutual TLS) over a federation store.

``create_app`` builds the application, ``serve`` runs it; ``CatalogState`` follows the store and keeps the merged
catalog with its change history for watchers.
"""

from federation.service.app import ServiceConfig, create_app, metrics_of, serve, state_of
from federation.service.state import CatalogState

__all__ = ["CatalogState", "ServiceConfig", "create_app", "metrics_of", "serve", "state_of"]
