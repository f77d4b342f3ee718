"""vswapctl's commands, by group; each group module registers its own subparsers."""
