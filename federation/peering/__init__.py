"""Peering between clustersets that do not share a root (SPIFFE Federation; see docs/peering.md).

:mod:`.records` holds the values members receive (pure); :mod:`.bundles` fetches, verifies and stores peer bundles;
:mod:`.exchange` serves and pulls the services exported to a peer; :mod:`.service` runs both in the federation
service, with the peering listener (bundle endpoint + exchange).
"""
