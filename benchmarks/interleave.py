"""Interleaved timing: two variants measured round by round, back to back.

On a shared host the machine's speed drifts over seconds, and timing one variant's rounds after the other's lets
that drift into their ratio (the block tables have seen eager's best round 25% under its median; the deploy
table's best-of-10 rows moved by up to 1.4x between two runs). Here every round times one step of each, alternating
which goes first, and the ratio reported is the median over rounds of the per-round ratios: both sides of each
ratio ran under the same conditions."""

from __future__ import annotations

import statistics


def interleave(collector, base_step, mine_step, pairs: int, record: dict) -> None:
    """Time ``pairs`` rounds of the two zero-argument steps (each returns its seconds) back to back,
    alternating which goes first, after two warm-up rounds (oneDNN / cuDNN primitive caches, allocator),
    and record the median of the per-round ratios."""
    for _ in range(2):
        base_step(), mine_step()
    base_s, mine_s, ratios = [], [], []
    for i in range(pairs):
        if i % 2 == 0:
            b, m = base_step(), mine_step()
        else:
            m, b = mine_step(), base_step()
        base_s.append(b)
        mine_s.append(m)
        ratios.append(b / m)
    collector.add(
        kind="head_to_head",
        **record,
        pairs=len(ratios),
        ratio_median=statistics.median(ratios),
        ratio_quartiles=statistics.quantiles(ratios, n=4) if len(ratios) >= 2 else [ratios[0]] * 3,
        eager_median_ms=statistics.median(base_s) * 1e3,
        median_ms=statistics.median(mine_s) * 1e3,
    )
