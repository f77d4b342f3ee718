"""hoststore: the host side of vswapfs, keeping accepted swap pages in RAM."""
