"""What vswapfs's link to a store daemon counts, defined once (``link_*`` in its stats)."""

from __future__ import annotations

from vswapcommon.counters import Definition, Unit, define

PAGES, REQUESTS, CONNECTIONS, EVENTS = Unit.PAGES, Unit.REQUESTS, Unit.CONNECTIONS, Unit.EVENTS

LinkCounter = define("LinkCounter", (
    Definition("CONNECTS", "link_connects", CONNECTIONS, "connections made to the store (hello answered)"),
    Definition("CONNECT_FAILURES", "link_connect_failures", CONNECTIONS, "attempts to connect that failed"),
    Definition("DISCONNECTS", "link_disconnects", CONNECTIONS, "connections lost"),
    Definition("HOST_RESTARTS", "link_host_restarts", EVENTS, "the store came back as a new instance"),
    Definition("SESSIONS_LOST", "link_sessions_lost", EVENTS, "reconnects where the store no longer held our pages"),
    Definition("HELLO_REFUSED", "link_hello_refused", CONNECTIONS, "hellos the store refused"),
    Definition("PROTOCOL_ERRORS", "link_protocol_errors", CONNECTIONS,
               "connections closed because the store broke the protocol"),
    Definition("ERRORS", "link_errors", CONNECTIONS, "connections closed by an unexpected error"),
    Definition("HANDBACK_REQUESTS", "link_handback_requests", REQUESTS, "hand-backs the store sent"),
    Definition("HANDBACKS_DEFERRED", "link_handbacks_deferred", REQUESTS,
               "hand-backs answered 'failed' at once: too many already in hand"),
    Definition("HANDBACK_ANSWERS_LOST", "link_handback_answers_lost", PAGES,
               "pages taken back whose answer could not be sent (the store keeps them until asked again)"),
    Definition("STORE_AUTH_FAILED", "link_store_auth_failed", CONNECTIONS,
               "peers that could not prove they are the store: sent nothing"),
    Definition("KEEPALIVES", "link_keepalives", REQUESTS, "keepalives sent on an idle connection"),
    Definition("SHARED_MAPS", "link_shared_maps", EVENTS, "shared page memory mapped (at each hello that offered it)"),
    Definition("SHARED_UNUSABLE", "link_shared_unusable", EVENTS,
               "shared memory offered but not usable: pages are read over the wire"),
    Definition("STAGED_PUT_PAGES", "link_staged_put_pages", PAGES,
               "pages put through the shared staging area, not the socket"),
), "vswapfs's link to a store daemon (`vswapctl stats`: the vswapfs section, `link_*`)")
