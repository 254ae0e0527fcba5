"""``meshfed dashboard``: a live page of the federation (docs/dashboard.md).

:mod:`meshfed.dashboard.view` builds the view (pure), :mod:`meshfed.dashboard.server` serves it (aiohttp, server-sent
events) with the page and its script from ``static/`` (written here, no third-party JavaScript, nothing from a CDN).
"""
