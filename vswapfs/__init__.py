"""vswapfs: a FUSE swap file whose pages go to a host store, or to a backing file when refused."""
