"""What the Redis Cluster page tier counts, defined once (``tier_*`` in the store's stats)."""

from __future__ import annotations

from vswapcommon.counters import Definition, Unit, define

PAGES, REQUESTS, EVENTS = Unit.PAGES, Unit.REQUESTS, Unit.EVENTS

TierCounter = define("TierCounter", (
    Definition("WRITTEN", "tier_written", PAGES, "pages a replica acknowledged"),
    Definition("REFUSED_REPLICATION", "tier_refused_replication", PAGES, "pages no replica acknowledged in time"),
    Definition("REFUSED_NO_REPLICA", "tier_refused_no_replica", PAGES,
               "of those, pages whose master had too few replicas in sync: not even sent"),
    Definition("REFUSED_UNREACHABLE", "tier_refused_unreachable", PAGES,
               "pages whose node did not answer, or had moved them"),
    Definition("REFUSED_OOM", "tier_refused_oom", PAGES, "pages whose node answered OOM (at maxmemory)"),
    Definition("READ", "tier_read", PAGES, "pages read from the cluster"),
    Definition("READ_RETRIES", "tier_read_retries", REQUESTS, "reads asked again after a node failed to answer"),
    Definition("READ_FAILURES", "tier_read_failures", REQUESTS,
               "requests whose read gave up (the cluster never answered)"),
    Definition("UNCONFIRMED_READS", "tier_unconfirmed_reads", EVENTS,
               "reads that a node not a master of a cluster in state ok answered with missing pages: asked again"),
    Definition("LOST", "tier_lost", PAGES, "pages the store held that the cluster no longer had"),
    Definition("DELETED", "tier_deleted", PAGES, "pages deleted from the cluster"),
    Definition("DELETE_RETRIES", "tier_delete_retries", EVENTS,
               "failed rounds of deletes (what they held stays queued, and is tried again)"),
    Definition("TOPOLOGY_REFRESHES", "tier_topology_refreshes", EVENTS, "reads of the cluster's slot map"),
    Definition("FAILOVERS", "tier_failovers", EVENTS, "slot ranges seen served by a new master after a refresh"),
    Definition("HEARTBEAT_FAILURES", "tier_heartbeat_failures", EVENTS, "heartbeat writes a master did not take"),
), "the Redis Cluster page tier (`hoststore --tier`; `vswapctl stats`: the hoststore section, `tier_*`)")
