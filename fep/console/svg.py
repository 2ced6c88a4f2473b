"""Bar charts drawn on the server as SVG, inline in the page: no script, nothing fetched, printable.

A chart is a row of labelled slots (hours, days) with one bar per series in each; the scale is a round number
at or above the highest bar, with four grid lines. Colours come from the page's CSS (the classes s0, s1)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from decimal import Decimal
from xml.sax.saxutils import escape

from markupsafe import Markup

WIDTH, HEIGHT = 760, 230
LEFT, RIGHT, TOP, BOTTOM = 64, 8, 28, 34


@dataclass(frozen=True)
class Series:
    name: str
    values: list[Decimal | int]


def top(highest: Decimal | int) -> Decimal:
    """The scale's top: 1, 2 or 5 times a power of ten, at or above `highest` (1 for an empty chart)."""
    if highest <= 0:
        return Decimal(1)
    power = Decimal(10) ** math.floor(math.log10(float(highest)))
    return next(power * m for m in (1, 2, 5, 10) if power * m >= highest)


def bars(title: str, labels: list[str], series: list[Series], every: int = 1) -> Markup:
    """`every`: label each slot, or every second, third... where they would crowd."""
    scale = top(max((v for s in series for v in s.values), default=0))
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    slot = plot_w / max(len(labels), 1)
    bar = slot * 0.8 / max(len(series), 1)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" '
           f'aria-label="{escape(title, {chr(34): "&quot;"})}"><title>{escape(title)}</title>']
    for i in range(5):
        y = TOP + plot_h - plot_h * i / 4
        out.append(f'<line class="grid" x1="{LEFT}" y1="{y:.1f}" x2="{WIDTH - RIGHT}" y2="{y:.1f}"/>'
                   f'<text class="axis" x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">'
                   f'{_number(scale * i / 4)}</text>')
    for k, s in enumerate(series):
        for i, v in enumerate(s.values):
            h = plot_h * float(v) / float(scale)
            x = LEFT + i * slot + slot * 0.1 + k * bar
            out.append(f'<rect class="s{k}" x="{x:.1f}" y="{TOP + plot_h - h:.1f}" width="{bar:.1f}" height="{h:.1f}">'
                       f'<title>{escape(s.name)} {escape(labels[i])}: {_number(v)}</title></rect>')
    for i, label in enumerate(labels):
        if i % every == 0:
            out.append(f'<text class="axis" x="{LEFT + (i + 0.5) * slot:.1f}" y="{HEIGHT - BOTTOM + 16}" '
                       f'text-anchor="middle">{escape(label)}</text>')
    x = LEFT
    for k, s in enumerate(series):  # the legend, above the plot
        out.append(f'<rect class="s{k}" x="{x}" y="8" width="12" height="12"/>'
                   f'<text class="legend" x="{x + 16}" y="18">{escape(s.name)}</text>')
        x += 24 + 8 * len(s.name) + 8 * sum(1 for c in s.name if ord(c) > 0x2e80)
    out.append("</svg>")
    return Markup("".join(out))


def _number(v: Decimal | int | float) -> str:
    d = Decimal(str(v))
    return f"{d:,.0f}" if d == d.to_integral_value() else f"{d:,.2f}"
