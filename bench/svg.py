"""Hand-written SVG for the bench: a horizontal bar chart (CPU per row, with the spread), a line
chart (latency vs offered load) and a flame graph from collapsed stacks (py-spy ``--format raw``).
No plotting dependency: the files are small, deterministic and open in any browser.
"""

from __future__ import annotations

from xml.sax.saxutils import escape

PALETTE = ("#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#9c755f")


def _svg(width: int, height: int, body: list[str]) -> str:
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">\n'
        f'<rect width="{width}" height="{height}" fill="white"/>\n' + "\n".join(body) + "\n</svg>\n"
    )


def bar_chart(title: str, bars: list[tuple[str, float, float, float, str]], unit: str) -> str:
    """``bars``: (label, value, low, high, group). One horizontal bar per entry, whiskers low-high."""
    label_w, bar_w, row_h, top = 460, 420, 22, 40
    vmax = max([b[3] for b in bars] + [b[1] for b in bars] + [1.0])
    groups: list[str] = []
    for b in bars:
        if b[4] not in groups:
            groups.append(b[4])
    height = top + row_h * len(bars) + 50
    out = [f'<text x="10" y="22" font-size="15" font-weight="bold">{escape(title)}</text>']
    for i, (label, v, lo, hi, group) in enumerate(bars):
        y = top + i * row_h
        color = PALETTE[groups.index(group) % len(PALETTE)]
        w = bar_w * v / vmax
        out.append(f'<text x="{label_w - 6}" y="{y + 15}" text-anchor="end">{escape(label[:70])}</text>')
        out.append(
            f'<rect x="{label_w}" y="{y + 3}" width="{w:.1f}" height="{row_h - 6}" fill="{color}">'
            f"<title>{escape(label)}: {v:.0f} {unit}</title></rect>"
        )
        if hi > lo:
            x0, x1 = label_w + bar_w * lo / vmax, label_w + bar_w * hi / vmax
            yc = y + row_h / 2
            out.append(f'<line x1="{x0:.1f}" y1="{yc}" x2="{x1:.1f}" y2="{yc}" stroke="black"/>')
            for x in (x0, x1):
                out.append(f'<line x1="{x:.1f}" y1="{yc - 4}" x2="{x:.1f}" y2="{yc + 4}" stroke="black"/>')
        out.append(f'<text x="{label_w + max(w, bar_w * hi / vmax) + 6:.1f}" y="{y + 15}">{v:,.0f}</text>')
    y = top + row_h * len(bars) + 20
    for gi, g in enumerate(groups):
        out.append(
            f'<rect x="{label_w + gi * 140}" y="{y}" width="12" height="12" fill="{PALETTE[gi % len(PALETTE)]}"/>'
            f'<text x="{label_w + gi * 140 + 16}" y="{y + 11}">{escape(g)}</text>'
        )
    out.append(
        f'<text x="{label_w}" y="{y + 30}" fill="#555">{escape(unit)} (median; whiskers: min-max over rounds)</text>'
    )
    return _svg(label_w + bar_w + 90, height + 20, out)


def line_chart(
    title: str, series: list[tuple[str, list[tuple[float, float]], bool]], xlabel: str, ylabel: str
) -> str:
    """``series``: (name, [(x, y)], dashed). Linear axes from 0."""
    W, H, L, B, T, R = 760, 440, 70, 60, 40, 230
    pw, ph = W - L - R, H - T - B
    xs = [x for _, pts, _ in series for x, _ in pts] or [1.0]
    ys = [y for _, pts, _ in series for _, y in pts] or [1.0]
    xmax, ymax = max(xs) * 1.05 or 1.0, max(ys) * 1.1 or 1.0
    out = [
        f'<text x="10" y="22" font-size="15" font-weight="bold">{escape(title)}</text>',
        f'<rect x="{L}" y="{T}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>',
    ]
    for k in range(6):
        gx, gy = L + pw * k / 5, T + ph - ph * k / 5
        out.append(f'<line x1="{L}" y1="{gy:.1f}" x2="{L + pw}" y2="{gy:.1f}" stroke="#eee"/>')
        out.append(f'<text x="{L - 6}" y="{gy + 4:.1f}" text-anchor="end">{ymax * k / 5:.1f}</text>')
        out.append(f'<text x="{gx:.1f}" y="{T + ph + 16}" text-anchor="middle">{xmax * k / 5:,.0f}</text>')
    out.append(f'<text x="{L + pw / 2}" y="{H - 20}" text-anchor="middle">{escape(xlabel)}</text>')
    out.append(
        f'<text x="16" y="{T + ph / 2}" transform="rotate(-90 16 {T + ph / 2})" text-anchor="middle">{escape(ylabel)}</text>'
    )
    names: list[str] = []
    for name, _pts, _dashed in series:
        base = name.rsplit(" ", 1)[0]
        if base not in names:
            names.append(base)
    for i, (name, pts, dashed) in enumerate(series):
        color = PALETTE[names.index(name.rsplit(" ", 1)[0]) % len(PALETTE)]
        coords = " ".join(f"{L + pw * x / xmax:.1f},{T + ph - ph * y / ymax:.1f}" for x, y in sorted(pts))
        dash = ' stroke-dasharray="6,4"' if dashed else ""
        out.append(f'<polyline points="{coords}" fill="none" stroke="{color}" stroke-width="2"{dash}/>')
        for x, y in pts:
            out.append(
                f'<circle cx="{L + pw * x / xmax:.1f}" cy="{T + ph - ph * y / ymax:.1f}" r="3" fill="{color}">'
                f"<title>{escape(name)}: {x:,.0f} req/s, {y:.2f}</title></circle>"
            )
        ly = T + 10 + i * 18
        out.append(
            f'<line x1="{W - R + 12}" y1="{ly}" x2="{W - R + 36}" y2="{ly}" stroke="{color}" stroke-width="2"{dash}/>'
            f'<text x="{W - R + 42}" y="{ly + 4}">{escape(name[:30])}</text>'
        )
    return _svg(W, H, out)


def flame_graph(title: str, stacks: dict[str, int], width: int = 1200) -> str:
    """A flame graph (root at the bottom) from collapsed stacks ``"a;b;c" -> samples``."""
    root: dict = {"n": 0, "c": {}}
    for stack, count in stacks.items():
        node = root
        node["n"] += count
        for frame in stack.split(";"):
            node = node["c"].setdefault(frame, {"n": 0, "c": {}})
            node["n"] += count
    total = root["n"] or 1

    def depth(n: dict) -> int:
        return 1 + max((depth(c) for c in n["c"].values()), default=0)

    row_h, top = 16, 30
    levels = depth(root)
    height = top + levels * row_h + 10
    out = [f'<text x="10" y="20" font-size="14" font-weight="bold">{escape(title)} ({total} samples)</text>']

    def draw(node: dict, name: str, x: float, level: int) -> None:
        w = width * node["n"] / total
        if w < 0.3:
            return
        y = height - 10 - (level + 1) * row_h
        hue = (hash(name.split(" (")[0]) % 40) + 10
        label = escape(name)
        pct = 100 * node["n"] / total
        out.append(
            f"<g><title>{label} - {node['n']} samples, {pct:.1f} %</title>"
            f'<rect x="{x:.1f}" y="{y}" width="{w:.1f}" height="{row_h - 1}" fill="hsl({hue},80%,60%)"/>'
        )
        chars = int(w / 7)
        if chars >= 3:
            out.append(f'<text x="{x + 2:.1f}" y="{y + 12}" font-size="11">{escape(name[:chars])}</text>')
        out.append("</g>")
        cx = x
        for cname, child in sorted(node["c"].items()):
            draw(child, cname, cx, level + 1)
            cx += width * child["n"] / total

    x = 0.0
    for cname, child in sorted(root["c"].items()):
        draw(child, cname, x, 0)
        x += width * child["n"] / total
    return _svg(width, height, out)


def top_frames(stacks: dict[str, int], n: int = 20) -> list[tuple[str, float, float]]:
    """(frame, inclusive %, self %) for the ``n`` frames with the most inclusive samples."""
    total = sum(stacks.values()) or 1
    incl: dict[str, int] = {}
    own: dict[str, int] = {}
    for stack, count in stacks.items():
        frames = stack.split(";")
        for f in set(frames):
            incl[f] = incl.get(f, 0) + count
        own[frames[-1]] = own.get(frames[-1], 0) + count
    ranked = sorted(incl.items(), key=lambda kv: -kv[1])[:n]
    return [(f, 100 * c / total, 100 * own.get(f, 0) / total) for f, c in ranked]
