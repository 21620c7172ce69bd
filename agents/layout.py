"""How agents are laid out in processes: one each, or agent hosts of K.

The one place that decides it for ``bus-agent --per-host`` and for busbench (its bus run
and its no-bus pool use the same layout), so the two cannot drift apart.
"""

from __future__ import annotations

from agentbus_zmq.bus import protocol as P

__all__ = ["AUTO", "PerHost", "auto_per_host", "host_layout", "resolve_per_host"]

#: ``--per-host auto``
AUTO = "auto"


def host_layout(replicas: int, per_host: int) -> list[tuple[int, int]]:
    """``(first, count)`` of each host's members for ``replicas`` agents numbered from 1,
    at most ``per_host`` a host, the hosts as even as they can be."""
    hosts = -(-replicas // per_host)
    base, extra = divmod(replicas, hosts)
    layout, first = [], 1
    for j in range(hosts):
        count = base + (j < extra)
        layout.append((first, count))
        first += count
    return layout


def auto_per_host(replicas: int, cores: int) -> int:
    """``--per-host auto``: enough hosts to fill the cores and no more (one agent per
    process while the agents are no more than the cores), each within MAX_HOST_AGENTS."""
    hosts = max(1, min(replicas, cores), -(-replicas // P.MAX_HOST_AGENTS))
    return -(-replicas // hosts)


def resolve_per_host(per_host: int | str, replicas: int, cores: int) -> int:
    """Agents per process for ``replicas`` agents: ``per_host`` (a count, or ``auto``),
    never more than there are agents."""
    k = auto_per_host(replicas, cores) if per_host == AUTO else int(per_host)
    return min(k, replicas)


def _per_host_type():
    import click

    class PerHost(click.ParamType):
        """``--per-host``: a positive integer (at most MAX_HOST_AGENTS), or ``auto``."""

        name = "K|auto"

        def convert(self, value, param, ctx):
            if value == AUTO or isinstance(value, int):
                return value
            try:
                k = int(value)
            except ValueError:
                k = 0
            if not 1 <= k <= P.MAX_HOST_AGENTS:
                self.fail(f"{value!r} is neither a count of agents per process (1 .. {P.MAX_HOST_AGENTS}) nor "
                          f"'auto'", param, ctx)
            return k

    return PerHost


PerHost = _per_host_type()
