"""Policy plug-ins for the tests (``--policy tests.policyplugins:NAME``)."""

from __future__ import annotations

from hoststore.policies import DecisionContext


def take_even(ctx: DecisionContext) -> list[bool]:
    """Take even page numbers only."""
    return [(ctx.first + i) % 2 == 0 for i in range(ctx.pages)]


def take_while_below(ctx: DecisionContext) -> bool:
    """Take the batch while the client holds fewer than 8 pages."""
    return ctx.client_pages < 8


def explode(ctx: DecisionContext) -> bool:
    raise RuntimeError("a plug-in with a bug")


def wrong_shape(ctx: DecisionContext) -> object:
    return "yes"
