"""Inline SVG charts, drawn on the server: no chart library, nothing for the browser to fetch."""

from __future__ import annotations

from collections.abc import Sequence

from markupsafe import Markup, escape


def _fmt(value: float) -> str:
    return f"{value:.2f}" if value < 10 else f"{value:.0f}"


def bar_chart(values: Sequence[float], failed: Sequence[float] = (), width: int = 720, height: int = 140,
              unit: str = "") -> Markup:
    """One bar per value (oldest left), failures stacked in red on top; the y axis tops at the max."""
    top = max([v + f for v, f in zip(values, failed or [0.0] * len(values), strict=True)] + [0.0])
    plot = height - 18
    step = width / max(1, len(values))
    parts = [f'<svg class="chart" viewBox="0 0 {width} {height}" role="img" '
             f'aria-label="{escape(unit)} per minute, last {len(values)} minutes">']
    for i, value in enumerate(values):
        bad = failed[i] if failed else 0.0
        h_ok = plot * value / top if top else 0
        h_bad = plot * bad / top if top else 0
        x = i * step
        parts.append(f'<rect class="ok" x="{x:.1f}" y="{plot - h_ok:.1f}" width="{step * 0.8:.1f}" '
                     f'height="{h_ok:.1f}"><title>{_fmt(value)} {escape(unit)}</title></rect>')
        if h_bad:
            parts.append(f'<rect class="bad" x="{x:.1f}" y="{plot - h_ok - h_bad:.1f}" width="{step * 0.8:.1f}" '
                         f'height="{h_bad:.1f}"><title>{_fmt(bad)} failed/s</title></rect>')
    parts.append(f'<line x1="0" y1="{plot}" x2="{width}" y2="{plot}" class="axis"/>')
    parts.append(f'<text x="0" y="{height - 4}" class="label">-{len(values)} min</text>')
    parts.append(f'<text x="{width}" y="{height - 4}" class="label" text-anchor="end">now</text>')
    parts.append(f'<text x="2" y="10" class="label">max {_fmt(top)} {escape(unit)}</text></svg>')
    return Markup("".join(parts))


def sparkline(values: Sequence[float], width: int = 180, height: int = 32, unit: str = "/s") -> Markup:
    top = max([*values, 0.0]) or 1.0
    step = width / max(1, len(values) - 1)
    points = " ".join(f"{i * step:.1f},{height - 2 - (height - 4) * v / top:.1f}" for i, v in enumerate(values))
    label = f"max {_fmt(top / 2**20)} MiB" if unit == "B" else f"max {_fmt(max([*values, 0.0]))}{unit}"
    return Markup(f'<svg class="spark" viewBox="0 0 {width} {height}" role="img" aria-label="{escape(label)}">'
                  f'<title>{escape(label)}</title><polyline points="{points}"/></svg>')
