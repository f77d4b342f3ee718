"""What the store counts, by cause: each counter's name, unit and meaning, defined once."""

from __future__ import annotations

from pagewire.causes import drop_counters, drop_map, handback_counters, handback_map, refusal_counters, refusal_map
from vswapcommon.counters import Definition, Unit, define

PAGES, REQUESTS, CONNECTIONS, EVENTS = Unit.PAGES, Unit.REQUESTS, Unit.CONNECTIONS, Unit.EVENTS

_PAGES = (
    Definition("ACCEPTED", "accepted", PAGES, "pages stored (new, or over an older version)"),
    Definition("REPLACED", "replaced", PAGES, "of those, stored over an older version of the page"),
    *refusal_counters("pages refused"),
    Definition("STALE_DROPPED", "stale_dropped", PAGES,
               "stored copies dropped because a newer version of their page was refused"),
    Definition("READS", "reads", PAGES, "pages served in get answers (reads from shared memory never reach the store)"),
    Definition("MISSES", "misses", PAGES, "pages asked for that the store did not hold"),
    Definition("INVALIDATED", "invalidated", PAGES, "pages dropped on the client's request (invalidate)"),
    Definition("DROPPED_SESSIONS", "dropped_sessions", PAGES,
               "pages of a client that came back as a new instance (its old pages are of no use)"),
    *handback_counters(),
    Definition("HANDBACK_NOT_NEEDED", "handback_not_needed", PAGES,
               "of the pages handed back, those the client no longer needed"),
    Definition("HANDBACK_FAILED", "handback_failed", PAGES, "pages handed back that the client could not take (kept)"),
    *drop_counters(),
    Definition("EVICTED", "evicted", PAGES, "pages of away clients dropped by an admin (vswapctl evict)"),
    Definition("DECODE_ERRORS", "decode_errors", PAGES,
               "compressed pages that did not decode to a page when read or handed back (damaged in the store's "
               "memory: a read of one fails, EIO, and a hand-back drops it)"),
    Definition("RECOMPRESSED", "recompressed_pages", PAGES,
               "idle pages recompressed with the stronger setting (--recompress-after)"),
)
_REQUESTS = (
    Definition("PUT_REQUESTS", "put_requests", REQUESTS, "put requests (batches of pages offered)"),
    Definition("GET_REQUESTS", "get_requests", REQUESTS, "get requests"),
    Definition("INVALIDATE_REQUESTS", "invalidate_requests", REQUESTS, "invalidate requests"),
    Definition("HANDBACK_REQUESTS", "handback_requests", REQUESTS, "hand-backs sent to clients"),
    Definition("EVICT_REQUESTS", "evict_requests", REQUESTS, "clients dropped by an admin (vswapctl evict)"),
    Definition("BAD_REQUESTS", "bad_requests", REQUESTS, "requests answered with an error (the connection kept)"),
    Definition("POLICY_CHANGES", "policy_changes", EVENTS, "changes of the policy or the limits at run time"),
    Definition("HANDBACK_ERRORS", "handback_errors", EVENTS, "unexpected errors while handing back (pages kept)"),
    Definition("DRAIN_GAVE_UP", "drain_gave_up", EVENTS,
               "clients a drain stopped waiting for: too slow to take their pages back (--drain-timeout)"),
    Definition("FAIR_WAITS", "fair_waits", EVENTS, "requests held back while other connections had their turn"),
)
_CONNECTIONS = (
    Definition("CONNECTIONS", "connections", CONNECTIONS, "connections accepted"),
    Definition("HELLO_REFUSED", "hello_refused", CONNECTIONS,
               "hellos refused, for any reason (refused_auth, refused_uid, refused_tcp_connections, "
               "refused_clients and refused_name_owner among them)"),
    Definition("PROTOCOL_ERRORS", "protocol_errors", CONNECTIONS, "connections closed for breaking the protocol"),
    Definition("CONNECTION_ERRORS", "connection_errors", CONNECTIONS,
               "connections closed by an unexpected error in serving them"),
    Definition("TAKEOVERS", "takeovers", CONNECTIONS, "a client's reconnect superseded its old connection"),
    Definition("REFUSED_AUTH", "refused_auth", CONNECTIONS, "hellos without the token's proof, or a wrong one"),
    Definition("REFUSED_UID", "refused_uid", CONNECTIONS, "hellos from a unix-socket peer whose uid is not allowed"),
    Definition("REFUSED_ADMIN_CONNECTIONS", "refused_admin_connections", CONNECTIONS,
               "closed at once: --max-connections admin=N reached"),
    Definition("REFUSED_UNIX_CONNECTIONS", "refused_unix_connections", CONNECTIONS,
               "closed at once: --max-connections unix=N reached"),
    Definition("REFUSED_TCP_CONNECTIONS", "refused_tcp_connections", CONNECTIONS,
               "hellos refused: --max-connections tcp=N reached"),
    Definition("CLOSED_HELLO_POOL", "closed_hello_pool", CONNECTIONS,
               "closed before their hello for a newer one: --max-connections hello=N reached"),
    Definition("REFUSED_PEER_CONNECTIONS", "refused_peer_connections", CONNECTIONS,
               "closed at once: --max-connections-per-peer reached"),
    Definition("REFUSED_CONNECTION_RATE", "refused_connection_rate", CONNECTIONS, "closed at once: --connection-rate"),
    Definition("REFUSED_CLIENTS", "refused_clients", CONNECTIONS, "hellos of new names beyond --max-clients"),
    Definition("REFUSED_NAME_OWNER", "refused_name_owner", CONNECTIONS,
               "hellos under a name that another identity holds"),
    Definition("CLOSED_HELLO_TIMEOUT", "closed_hello_timeout", CONNECTIONS, "no answered hello within --hello-timeout"),
    Definition("CLOSED_IDLE", "closed_idle", CONNECTIONS, "no complete message within --idle-timeout"),
    Definition("CLOSED_OVERSIZED", "closed_oversized_frame", CONNECTIONS, "a length prefix above any legal message"),
    Definition("CLOSED_FRAME_TIMEOUT", "closed_frame_timeout", CONNECTIONS,
               "a frame begun and not finished within --frame-timeout"),
    Definition("CLOSED_IN_FLIGHT", "closed_in_flight", CONNECTIONS,
               "closed because the store held more than --max-in-flight for their pool (or for its own "
               "hand-backs), their peers having kept it waiting longest, over --shed-after"),
)

HostCounter = define("HostCounter", (*_PAGES, *_REQUESTS, *_CONNECTIONS),
                     "hoststore's counters (`vswapctl stats`: the hoststore section; each client's own too)")
REFUSAL_COUNTER = refusal_map(HostCounter)
HANDBACK_COUNTER = handback_map(HostCounter)
DROP_COUNTER = drop_map(HostCounter)
