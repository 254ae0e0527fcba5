"""Federation stores: one Protocol (``base.Store``), SQLite (embedded default) and etcd (scale-out)."""
