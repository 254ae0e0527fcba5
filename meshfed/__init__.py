"""meshfed."""
