"""vswapctl: bring a vswapfs swap device up and down, and look inside it."""
