"""Multi-series line charts as PNG files, drawn with p2pnode's stdlib renderer.

The pixels, lines, discs, the 5x7 font, the PNG encoder and :func:`~p2pnode.sim.nice_ticks`
come from :mod:`p2pnode.sim`; this module adds what the benchmark report needs on top: any
number of series per chart (each with a legend entry, optional markers and min-max whiskers),
axis labels, ticks, an optional logarithmic x axis, dashed reference lines, and several charts
stacked in one image.

Usage::

    chart = Chart("Round trip", [Series("p2pnode", [(1, 0.2), (2, 0.9)])], "ms", "fraction")
    Path("rtt.png").write_bytes(figure_png([chart], title="Latency"))

The font has capitals, digits and ``space . , : % - + = / ( )`` only: other characters are
replaced (:func:`plain_text`), lowercase is drawn as capitals.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

from p2pnode.sim import (
    GLYPH_HEIGHT,
    GLYPHS,
    GRID,
    INK,
    RGB,
    SERIES,
    SUBTLE_INK,
    WHITE,
    Canvas,
    nice_ticks,
)

#: Series colours: p2pnode.sim's three, then more for charts with more series.
PALETTE: Final[tuple[RGB, ...]] = (
    *SERIES,
    (255, 127, 14),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
)
#: Replacements for characters the font lacks (anything else missing becomes a space).
REPLACEMENTS: Final[dict[str, str]] = {
    "_": " ",
    ";": ",",
    "\u2013": "-",
    "\u2014": "-",
    "\u00d7": "X",
    "\u00b5": "U",
    "<": "(",
    ">": ")",
    "[": "(",
    "]": ")",
    "~": "",
    "'": "",
    '"': "",
}

#: Geometry, pixels.
FIGURE_WIDTH: Final = 960
CHART_HEIGHT: Final = 380
MARGIN: Final = 20
CHART_GAP: Final = 30
SCALE: Final = 2  # font scale of every text
LINE_HEIGHT: Final = (GLYPH_HEIGHT + 4) * SCALE
TICK_LENGTH: Final = 5
TICK_GAP: Final = 8
LEGEND_SWATCH: Final = 28
LEGEND_GAP: Final = 24
LINE_WIDTH: Final = 3
POINT_RADIUS: Final = 5
WHISKER_CAP: Final = 5
GRID_DASH: Final = 4
MARK_DASH: Final = 8
#: Fraction of the data's span left empty above and below it on a linear y axis.
Y_PADDING: Final = 0.06
#: Fraction of the x span (in log units on a log axis) left empty at each end.
X_PADDING: Final = 0.04


def plain_text(text: str) -> str:
    """``text`` with every character the font lacks replaced (see :data:`REPLACEMENTS`)."""
    out = []
    for char in text.upper():
        if char in GLYPHS:
            out.append(char)
        else:
            out.append(REPLACEMENTS.get(char, " "))
    return "".join(out)


def format_number(value: float) -> str:
    """A tick or annotation label: thousands separated by commas from 1,000 up, at most three
    significant digits below."""
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if value == round(value):
        return f"{value:.0f}"
    return f"{value:.3g}"


@dataclass(frozen=True)
class Series:
    """One line of a chart.

    Args:
        label: legend text.
        points: ``(x, y)`` pairs, drawn in order (sort them by x for a line chart).
        spread: optional ``(low, high)`` per point, drawn as a vertical whisker.
        markers: draw a disc at every point (turn off for dense data such as a CDF).
        dash: draw the line dashed with runs of this many pixels (0: solid).
        colour: None picks the next colour of :data:`PALETTE`.
    """

    label: str
    points: Sequence[tuple[float, float]]
    spread: Sequence[tuple[float, float]] | None = None
    markers: bool = True
    dash: int = 0
    colour: RGB | None = None


@dataclass(frozen=True)
class Mark:
    """A dashed reference line across the chart (a target, say) with a short label.

    The label goes at the line's far end (top of a vertical line, right end of a horizontal
    one) unless ``label_at`` gives its place along the line in data units (a y value for a
    vertical line, an x value for a horizontal one).
    """

    value: float
    label: str
    colour: RGB = SUBTLE_INK
    label_at: float | None = None


@dataclass(frozen=True)
class Chart:
    """One chart: its series, axis labels and axis options.

    Args:
        title: drawn above the chart.
        series: the lines; a series without points is left out of the chart and the legend.
        x_label, y_label: axis names (the y label is drawn above the y axis).
        log_x: logarithmic x axis (points with x <= 0 are dropped).
        x_ticks: tick positions on x (default: round values covering the data).
        y_range: fixed ``(low, high)`` of the y axis; None entries follow the data.
        x_marks, y_marks: vertical and horizontal reference lines.
    """

    title: str
    series: Sequence[Series]
    x_label: str
    y_label: str
    log_x: bool = False
    x_ticks: Sequence[float] | None = None
    y_range: tuple[float | None, float | None] = (None, None)
    x_marks: Sequence[Mark] = field(default_factory=tuple)
    y_marks: Sequence[Mark] = field(default_factory=tuple)

    def has_data(self) -> bool:
        """Whether any series has a point to draw."""
        return bool(drawable(self))


def _usable(point: tuple[float, float], log_x: bool) -> bool:
    x, y = point
    return math.isfinite(x) and math.isfinite(y) and (x > 0 or not log_x)


def drawable(chart: Chart) -> list[Series]:
    """The chart's series that have a point to draw, with only those points (and their
    whiskers), each with its colour set."""
    series = []
    for index, item in enumerate(chart.series):
        spreads: list[tuple[float, float] | None] = list(item.spread or ())
        spreads += [None] * (len(item.points) - len(spreads))
        pairs = [
            (point, spread)
            for point, spread in zip(item.points, spreads, strict=False)
            if _usable(point, chart.log_x)
        ]
        if not pairs:
            continue
        kept_spread = [spread for _, spread in pairs if spread is not None]
        series.append(
            Series(
                item.label,
                [point for point, _ in pairs],
                kept_spread if item.spread else None,
                item.markers,
                item.dash,
                item.colour or PALETTE[index % len(PALETTE)],
            )
        )
    return series


def _extend_to_ticks(low: float, high: float) -> tuple[float, float, list[float]]:
    """Round ``[low, high]`` out to tick boundaries; the range and its ticks."""
    if high <= low:
        pad = abs(low) * 0.1 or 1.0
        low, high = low - pad, high + pad
    ticks = nice_ticks(low, high)
    if len(ticks) >= 2:
        step = ticks[1] - ticks[0]
        low = min(low, math.floor(low / step + 1e-9) * step)
        high = max(high, math.ceil(high / step - 1e-9) * step)
        ticks = nice_ticks(low, high)
    return low, high, ticks


def log_ticks(low: float, high: float) -> list[float]:
    """Round tick values for a log axis from ``low`` to ``high`` (both > 0): 1, 2 and 5 times
    powers of ten over up to three decades, powers of ten only beyond."""
    first, last = math.floor(math.log10(low)), math.ceil(math.log10(high))
    steps = (1.0, 2.0, 5.0) if last - first <= 3 else (1.0,)
    ticks = [
        step * 10.0**power
        for power in range(first, last + 1)
        for step in steps
        if low * (1 - 1e-9) <= step * 10.0**power <= high * (1 + 1e-9)
    ]
    return ticks or [low, high]


class _Axes:
    """Maps data coordinates to pixels inside the plot area of one chart."""

    def __init__(
        self,
        chart: Chart,
        box: tuple[int, int, int, int],
        x_range: tuple[float, float],
        y_range: tuple[float, float],
    ) -> None:
        self.log_x = chart.log_x
        self.left, self.top, self.right, self.bottom = box
        self.x_low, self.x_high = (
            (math.log10(x_range[0]), math.log10(x_range[1])) if self.log_x else x_range
        )
        self.y_low, self.y_high = y_range

    def x(self, value: float) -> int:
        """The pixel column of data x ``value``."""
        if self.log_x:
            value = math.log10(value)
        span = (self.x_high - self.x_low) or 1.0
        return round(self.left + (value - self.x_low) / span * (self.right - self.left))

    def y(self, value: float) -> int:
        """The pixel row of data y ``value``."""
        span = (self.y_high - self.y_low) or 1.0
        return round(self.bottom - (value - self.y_low) / span * (self.bottom - self.top))


def _legend_rows(series: Sequence[Series], width: int) -> list[list[int]]:
    """Indices of the legend entries on each legend row, filling rows up to ``width``."""
    rows: list[list[int]] = [[]]
    used = 0
    for index, item in enumerate(series):
        need = LEGEND_SWATCH + TICK_GAP + Canvas.text_width(plain_text(item.label), SCALE)
        if rows[-1] and used + LEGEND_GAP + need > width:
            rows.append([])
            used = 0
        used += need + (LEGEND_GAP if rows[-1] else 0)
        rows[-1].append(index)
    return rows


def _ranges(chart: Chart, series: Sequence[Series]) -> tuple[float, float, float, float]:
    """The data's x and y extent, reference lines and whiskers included."""
    xs = [x for item in series for x, _ in item.points]
    ys = [y for item in series for _, y in item.points]
    for item in series:
        for low, high in item.spread or ():
            ys += [low, high]
    xs += [mark.value for mark in chart.x_marks if mark.value > 0 or not chart.log_x]
    ys += [mark.value for mark in chart.y_marks]
    if chart.x_ticks:
        xs += [tick for tick in chart.x_ticks if tick > 0 or not chart.log_x]
    return min(xs), max(xs), min(ys), max(ys)


def draw_chart(canvas: Canvas, chart: Chart, left: int, top: int, width: int, height: int) -> None:
    """Draw ``chart`` into the box of ``width`` x ``height`` pixels whose top-left corner is
    ``(left, top)`` on ``canvas``: title, legend, y label, grid, axes with tick labels, x label,
    reference lines, then every series. A chart without data says so."""
    canvas.text(left, top, plain_text(chart.title), INK, scale=SCALE)
    y = top + LINE_HEIGHT + 4
    series = drawable(chart)
    if not series:
        canvas.text(left, y + LINE_HEIGHT, "NO DATA", SUBTLE_INK, scale=SCALE)
        return

    # Legend.
    for entries in _legend_rows(series, width):
        x = left
        for index in entries:
            item = series[index]
            colour = item.colour or INK
            middle = y + GLYPH_HEIGHT * SCALE // 2
            canvas.line(
                x, middle, x + LEGEND_SWATCH, middle, colour, width=LINE_WIDTH, dash=item.dash
            )
            if item.markers:
                canvas.disc(x + LEGEND_SWATCH // 2, middle, POINT_RADIUS - 1, colour)
            x += LEGEND_SWATCH + TICK_GAP
            label = plain_text(item.label)
            canvas.text(x, y, label, INK, scale=SCALE)
            x += Canvas.text_width(label, SCALE) + LEGEND_GAP
        y += LINE_HEIGHT
    y += 4
    canvas.text(left, y, plain_text(chart.y_label), SUBTLE_INK, scale=SCALE)
    y += LINE_HEIGHT

    # Axis ranges and ticks.
    x_min, x_max, y_min, y_max = _ranges(chart, series)
    fixed_low, fixed_high = chart.y_range
    y_span = (y_max - y_min) or abs(y_max) or 1.0
    y_low = fixed_low if fixed_low is not None else y_min - Y_PADDING * y_span
    y_high = fixed_high if fixed_high is not None else y_max + Y_PADDING * y_span
    if fixed_low is None and y_min >= 0 > y_low:
        y_low = 0.0  # do not pad a non-negative quantity below zero
    y_low, y_high, y_ticks = _extend_to_ticks(y_low, y_high)
    if fixed_low is not None:
        y_low = fixed_low
    if fixed_high is not None:
        y_high = fixed_high
    y_ticks = [tick for tick in y_ticks if y_low - 1e-9 <= tick <= y_high + 1e-9]
    if chart.log_x:
        x_ticks = list(chart.x_ticks or log_ticks(x_min, x_max))
        ratio = (x_max / x_min) ** X_PADDING if x_max > x_min else 2.0
        x_range = (x_min / ratio, x_max * ratio)
    else:
        x_ticks = list(chart.x_ticks or nice_ticks(x_min, x_max))
        pad = (x_max - x_min) * X_PADDING or 1.0
        x_range = (x_min - pad, x_max + pad)

    labels_width = max(Canvas.text_width(format_number(tick), SCALE) for tick in y_ticks)
    plot_left = left + labels_width + TICK_GAP + TICK_LENGTH
    plot_right = left + width - 1
    plot_top = y + GLYPH_HEIGHT * SCALE // 2
    plot_bottom = top + height - 2 * LINE_HEIGHT - TICK_GAP
    axes = _Axes(chart, (plot_left, plot_top, plot_right, plot_bottom), x_range, (y_low, y_high))

    # Grid, axes, tick labels.
    for tick in y_ticks:
        row = axes.y(tick)
        canvas.line(plot_left, row, plot_right, row, GRID)
        canvas.line(plot_left - TICK_LENGTH, row, plot_left, row, INK)
        label = format_number(tick)
        canvas.text(
            plot_left - TICK_LENGTH - TICK_GAP - Canvas.text_width(label, SCALE),
            row - GLYPH_HEIGHT * SCALE // 2,
            label,
            INK,
            scale=SCALE,
        )
    for tick in x_ticks:
        column = axes.x(tick)
        if not plot_left <= column <= plot_right:
            continue
        canvas.line(column, plot_top, column, plot_bottom, GRID, dash=GRID_DASH)
        canvas.line(column, plot_bottom, column, plot_bottom + TICK_LENGTH, INK)
        label = format_number(tick)
        canvas.text(
            column - Canvas.text_width(label, SCALE) // 2,
            plot_bottom + TICK_LENGTH + TICK_GAP // 2,
            label,
            INK,
            scale=SCALE,
        )
    canvas.line(plot_left, plot_top, plot_left, plot_bottom, INK)
    canvas.line(plot_left, plot_bottom, plot_right, plot_bottom, INK)
    x_label = plain_text(chart.x_label + (" (log scale)" if chart.log_x else ""))
    canvas.text(
        (plot_left + plot_right - Canvas.text_width(x_label, SCALE)) // 2,
        plot_bottom + TICK_LENGTH + TICK_GAP // 2 + LINE_HEIGHT,
        x_label,
        SUBTLE_INK,
        scale=SCALE,
    )

    _draw_marks(canvas, chart, axes)

    # Series: whiskers, lines, then markers on top.
    for item in series:
        colour = item.colour or INK
        pixels = [(axes.x(x), axes.y(y)) for x, y in item.points]
        if item.spread:
            for (column, _), (low, high) in zip(pixels, item.spread, strict=False):
                top_row, bottom_row = axes.y(high), axes.y(low)
                canvas.line(column, top_row, column, bottom_row, colour, width=1)
                for row in (top_row, bottom_row):
                    canvas.line(column - WHISKER_CAP, row, column + WHISKER_CAP, row, colour)
        for (x0, y0), (x1, y1) in itertools.pairwise(pixels):
            canvas.line(x0, y0, x1, y1, colour, width=LINE_WIDTH, dash=item.dash)
        if item.markers:
            for column, row in pixels:
                canvas.disc(column, row, POINT_RADIUS, colour)


def _draw_marks(canvas: Canvas, chart: Chart, axes: _Axes) -> None:
    """The reference lines and their labels. Labels left at the far end are stacked a line
    apart (vertical lines) or side by side (horizontal lines), so that close lines' labels do
    not overlap; a label that would stick out above the plot goes below its line."""
    height = GLYPH_HEIGHT * SCALE
    stacked = 0
    for mark in chart.x_marks:
        if mark.value <= 0 and chart.log_x:
            continue
        column = axes.x(mark.value)
        canvas.line(column, axes.top, column, axes.bottom, mark.colour, width=2, dash=MARK_DASH)
        if mark.label_at is None:
            row = axes.top + 4 + stacked * LINE_HEIGHT
            stacked += 1
        else:
            row = axes.y(mark.label_at) - height // 2
        canvas.text(column + 6, row, plain_text(mark.label), mark.colour, scale=SCALE)
    right = axes.right - 4
    for mark in chart.y_marks:
        row = axes.y(mark.value)
        canvas.line(axes.left, row, axes.right, row, mark.colour, width=2, dash=MARK_DASH)
        label = plain_text(mark.label)
        width = Canvas.text_width(label, SCALE)
        top = row - height - 4
        if top < axes.top:
            top = row + 5
        if mark.label_at is None:
            canvas.text(right - width, top, label, mark.colour, scale=SCALE)
            right -= width + LEGEND_GAP
        else:
            canvas.text(axes.x(mark.label_at) + 4, top, label, mark.colour, scale=SCALE)


def figure_png(
    charts: Sequence[Chart],
    *,
    title: str,
    subtitle: Sequence[str] = (),
    width: int = FIGURE_WIDTH,
    chart_height: int = CHART_HEIGHT,
) -> bytes:
    """``charts`` stacked top to bottom under a title and subtitle lines, as a PNG file.

    Each chart gets ``chart_height`` pixels plus one legend row per extra row its legend
    needs; the figure is ``width`` pixels wide.
    """
    inner = width - 2 * MARGIN
    heights = [
        chart_height + LINE_HEIGHT * (len(_legend_rows(drawable(chart), inner)) - 1)
        for chart in charts
    ]
    head = MARGIN + LINE_HEIGHT * (1 + len(subtitle)) + CHART_GAP // 2
    total = head + sum(heights) + CHART_GAP * max(0, len(charts) - 1) + MARGIN
    canvas = Canvas(width, total, WHITE)
    canvas.text(MARGIN, MARGIN, plain_text(title), INK, scale=SCALE)
    for index, line in enumerate(subtitle):
        canvas.text(
            MARGIN, MARGIN + LINE_HEIGHT * (index + 1), plain_text(line), SUBTLE_INK, scale=SCALE
        )
    y = head
    for chart, height in zip(charts, heights, strict=True):
        draw_chart(canvas, chart, MARGIN, y, inner, height)
        y += height + CHART_GAP
    return canvas.png()


def cdf_points(samples: Sequence[float], *, limit: int = 2000) -> list[tuple[float, float]]:
    """Points ``(value, fraction of samples <= value)`` of the empirical CDF of ``samples``,
    at most about ``limit`` of them (evenly spaced in rank, the smallest and largest kept)."""
    ordered = sorted(sample for sample in samples if math.isfinite(sample))
    n = len(ordered)
    if not n:
        return []
    step = max(1, n // limit)
    ranks = list(range(0, n, step))
    if ranks[-1] != n - 1:
        ranks.append(n - 1)
    return [(ordered[rank], (rank + 1) / n) for rank in ranks]
