"""``python -m meshfed`` runs the ``meshfed`` command (the local runner starts its children this way)."""

from meshfed.cli import main

main()
