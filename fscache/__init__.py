"""fscache: a stacked FUSE filesystem whose clean file pages go to a host store's ephemeral pool."""
