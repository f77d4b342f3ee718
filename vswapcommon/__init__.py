"""vswapcommon: helpers every program of the project uses (counters, sizes, CLI
argument types, logging, process hardening, the Prometheus glue).  It imports
no other package of the project."""
