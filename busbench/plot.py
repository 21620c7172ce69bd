"""``--plot``: throughput and efficiency against agent count, with the ideal lines."""

from __future__ import annotations

__all__ = ["plot"]


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in result["runs"] if "rate" in r]
    if not runs:
        raise ValueError("no completed run to plot")
    n = [r["agents"] for r in runs]
    r1, c = result["single_agent_rate"], result["cores"]
    cfg = result["config"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    null = cfg["kind"] == "null"  # r1 of a no-op: no meaningful ideal or efficiency
    if not null:
        ax1.plot(n, [min(k, c) * r1 for k in n], "--", color="0.5", label=f"ideal: min(N, {c} cores) x r1")
    pooled = [r for r in runs if r.get("pool_rate")]
    if pooled:
        ax1.plot([r["agents"] for r in pooled], [r["pool_rate"] for r in pooled], "^:", color="C2",
                 label="same agents, no bus: R_pool(N)")
    peered = [r for r in runs if r.get("peer_rate")]
    if peered:
        ax1.plot([r["agents"] for r in peered], [r["peer_rate"] for r in peered], "D-.", color="C3",
                 label="same agents, Gymnasium AsyncVectorEnv: R_peer(N)")
    ax1.plot(n, [r["rate"] for r in runs], "o-", color="C0", lw=2, label="agentbus R(N)")
    if any(r.get("repeat", 1) > 1 for r in runs):
        ax1.fill_between(n, [r["spread"]["rate"][0] for r in runs], [r["spread"]["rate"][1] for r in runs],
                         color="C0", alpha=0.2, label="min-max over repeats")
    ax1.set(xlabel="agents N", ylabel="agent-steps per second", title="Throughput", ylim=(0, None))
    ax1.legend(loc="lower right", fontsize=8)
    ax2.axhline(100, ls="--", color="0.5", label="ideal")
    ax2.axhline(90, ls=":", color="C2", label="target 90 %")
    if null:
        ax2.text(0.5, 0.5, "not meaningful for null agents\n(r1 is the rate of a no-op)", ha="center",
                 transform=ax2.transAxes)
    else:
        ax2.plot(n, [100 * r["efficiency"] for r in runs], "o-", color="C0", lw=2, label="E(N) = R / (min(N, C) r1)")
        ax2.plot(n, [100 * r["efficiency_peer"] for r in runs], "s--", color="C1", label="peer's R / (N r1)")
    if pooled:
        ax2.plot([r["agents"] for r in pooled], [100 * r["efficiency_pool"] for r in pooled], "^:", color="C2",
                 lw=2, label="E_pool = R / R_pool (the bus's share)")
    if peered:
        ax2.plot([r["agents"] for r in peered], [100 * r["efficiency_peer_rate"] for r in peered], "D-.", color="C3",
                 lw=2, label="R / R_peer (above 100: ahead of the peer)")
    ax2.set(xlabel="agents N", ylabel="efficiency (%)", title="Coordination efficiency",
            ylim=(0, max(110, *(105 * r["efficiency_peer_rate"] for r in peered))))
    ax2.legend(loc="lower left", fontsize=8)
    for ax in (ax1, ax2):
        if max(n) > 20 * min(n):  # counts over decades: a log axis keeps the small ones apart
            ax.set_xscale("log")
        ax.set_xticks(n, [f"{k:,}" for k in n])
        ax.minorticks_off()
        ax.grid(alpha=0.3)
    kind = cfg["kind"] + (f"/{cfg['backend']}" if cfg["kind"] == "explorer" else "")
    layout = "" if str(cfg.get("per_host", "1")) == "1" else f" in agent hosts (--per-host {cfg['per_host']})"
    fig.suptitle(f"busbench: {kind} agents{layout}, {cfg['mode']}, {c} cores, r1 = {r1:.0f} steps/s", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
