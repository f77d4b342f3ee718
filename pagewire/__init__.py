"""pagewire: what vswapfs and hoststore share on the wire, and nothing else.

The messages and their validation, the sans-IO protocol, the trio endpoint,
authentication, addresses, peer access rules and the client's half of the
shared-memory layout.  It depends on ``vswapcommon`` only: neither the store
nor the pager is imported here, so both sides can depend on it.
"""
