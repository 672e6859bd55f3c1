"""Product drawings for the sample catalog: 16 product types, each a parametric family.

Every drawer gets a fresh ``numpy`` generator seeded per product, so the same product
is drawn with the same proportions and details in every pose; ``pose`` (0 = frontal,
1 = turned) changes only what a turned camera would see (a handle behind the body, a
book's spine, a sofa's depth). Coordinates are fractions of a square canvas; the
canvas is drawn at twice the output resolution and reduced, which anti-aliases edges.
"""
from __future__ import annotations

import colorsys
import math
from typing import Callable

import numpy as np
from PIL import Image, ImageChops, ImageDraw

Color = tuple[int, int, int]
Fill = "Color | Image.Image"

SPRITE = 256  # output sprite side in pixels
SS = 2  # supersampling factor
N = SPRITE * SS


def u(rng: np.random.Generator, a: float, b: float) -> float:
    return float(rng.uniform(a, b))


def pick(rng: np.random.Generator, seq):
    return seq[int(rng.integers(len(seq)))]


def shade(c: Color, f: float) -> Color:
    return tuple(int(max(0, min(255, round(v * f)))) for v in c)  # type: ignore[return-value]


def mix(a: Color, b: Color, t: float) -> Color:
    return tuple(int(round(x * (1 - t) + y * t)) for x, y in zip(a, b))  # type: ignore[return-value]


def hsv(h: float, s: float, v: float) -> Color:
    r, g, b = colorsys.hsv_to_rgb(h % 1.0, max(0.0, min(1.0, s)), max(0.0, min(1.0, v)))
    return (int(round(r * 255)), int(round(g * 255)), int(round(b * 255)))


NEUTRALS: dict[str, Color] = {
    "black": (34, 34, 37), "white": (238, 238, 234), "grey": (126, 128, 133), "silver": (192, 194, 198),
    "walnut": (92, 60, 38), "oak": (178, 134, 86), "beige": (216, 198, 162), "navy": (32, 42, 82),
    "brass": (181, 148, 72),
}


class Sprite:
    """An RGBA drawing surface addressed in canvas fractions; fills are colours or textures."""

    def __init__(self, ground: Color = (128, 128, 128)) -> None:
        # the colour under the drawing bleeds into anti-aliased edges: use the product's own
        self.rgb = Image.new("RGB", (N, N), ground)
        self.alpha = Image.new("L", (N, N), 0)
        self._d_rgb = ImageDraw.Draw(self.rgb)
        self._d_alpha = ImageDraw.Draw(self.alpha)
        self._mask = Image.new("L", (N, N), 0)
        self._d_mask = ImageDraw.Draw(self._mask)

    @staticmethod
    def _px(xy):
        if isinstance(xy[0], (tuple, list)):
            return [(float(x) * N, float(y) * N) for x, y in xy]
        x0, y0, x1, y1 = (float(v) * N for v in xy)
        return (min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))

    def draw(self, method: str, xy, fill, *, width: float | None = None, ring: bool = False,
             radius: float | None = None, start: float = 0.0, end: float = 360.0) -> None:
        pts = self._px(xy)

        def call(d: ImageDraw.ImageDraw, value) -> None:
            kw: dict = {}
            if method in ("line", "arc"):
                kw = {"fill": value, "width": max(1, int(round((width or 0.01) * N)))}
                if method == "line":
                    kw["joint"] = "curve"
            elif ring:
                kw = {"fill": None, "outline": value, "width": max(1, int(round((width or 0.01) * N)))}
            else:
                kw = {"fill": value}
            if radius is not None:
                kw["radius"] = radius * N
            if method in ("arc", "chord", "pieslice"):
                getattr(d, method)(pts, start, end, **kw)
            else:
                getattr(d, method)(pts, **kw)

        if isinstance(fill, Image.Image):
            self._mask.paste(0, (0, 0, N, N))
            call(self._d_mask, 255)
            box = self._mask.getbbox()
            if box:
                m = self._mask.crop(box)
                self.rgb.paste(fill.crop(box), box, m)
                self.alpha.paste(255, box, m)
        else:
            call(self._d_rgb, tuple(fill))
            call(self._d_alpha, 255)

    # shorthands
    def poly(self, pts, fill, **kw):
        self.draw("polygon", pts, fill, **kw)

    def rect(self, box, fill, r: float = 0.0, **kw):
        if r > 0:
            self.draw("rounded_rectangle", box, fill, radius=r, **kw)
        else:
            self.draw("rectangle", box, fill, **kw)

    def ellipse(self, box, fill, **kw):
        self.draw("ellipse", box, fill, **kw)

    def line(self, pts, fill, width: float):
        self.draw("line", pts, fill, width=width)

    def arc(self, box, start, end, fill, width: float):
        self.draw("arc", box, fill, width=width, start=start, end=end)

    def chord(self, box, start, end, fill):
        self.draw("chord", box, fill, start=start, end=end)

    def finish(self, shading: str, highlight: bool, light: float) -> Image.Image:
        """Reduce to SPRITE px, shade (cylinder or top light), add a specular stripe → RGBA."""
        alpha = self.alpha.reduce(SS)
        rgb = self.rgb.reduce(SS)
        box = alpha.getbbox()
        if box is None:
            return Image.new("RGBA", (SPRITE, SPRITE), (0, 0, 0, 0))
        x0, y0, x1, y1 = box
        w = max(1, x1 - x0)
        xs = (np.arange(SPRITE, dtype=np.float32) - (x0 + w * (0.5 - 0.18 * light))) / (w / 2)
        if shading == "cyl":
            prof = 1.0 - 0.34 * np.clip(np.abs(xs), 0, 1.2) ** 2
            ys = np.ones(SPRITE, np.float32)
        else:
            prof = 1.06 - 0.12 * np.clip(xs, -1.2, 1.2)
            ys = 1.06 - 0.14 * np.clip((np.arange(SPRITE, dtype=np.float32) - y0) / max(1, y1 - y0), 0, 1)
        sh = np.clip(np.outer(ys, prof) * 255, 0, 255).astype(np.uint8)
        shl = Image.fromarray(sh, "L")
        rgb = ImageChops.multiply(rgb, Image.merge("RGB", (shl, shl, shl)))
        if highlight:
            hx = x0 + w * (0.3 - 0.12 * light)
            hw = w * 0.07
            m = Image.new("L", (SPRITE, SPRITE), 0)
            ImageDraw.Draw(m).rounded_rectangle((hx, y0 + (y1 - y0) * 0.12, hx + hw, y1 - (y1 - y0) * 0.14),
                                                radius=hw / 2, fill=70)
            rgb.paste((255, 255, 255), (0, 0), ImageChops.multiply(m, alpha))
        rgb.putalpha(alpha)
        return rgb


# ----------------------------------------------------------------------------- patterns

PATTERNS = ("solid", "stripes", "dots", "checker", "gradient", "plaid", "chevron", "bands", "speckle")
PATTERN_WEIGHTS = (0.2, 0.16, 0.12, 0.1, 0.1, 0.08, 0.08, 0.08, 0.08)

_YY, _XX = np.mgrid[0:SPRITE, 0:SPRITE].astype(np.float32)


def _two(mask: np.ndarray, a: Color, b: Color) -> Image.Image:
    """Boolean/float mask → RGB image blending colours a (0) and b (1)."""
    if mask.dtype == bool:
        m = mask.view(np.uint8) * np.uint8(255)
    else:
        m = np.clip(mask * 255, 0, 255).astype(np.uint8)
    size = (mask.shape[1], mask.shape[0])
    return Image.composite(Image.new("RGB", size, b), Image.new("RGB", size, a), Image.fromarray(m, "L"))


def pattern_texture(kind: str, rng: np.random.Generator, c1: Color, c2: Color, c3: Color) -> Image.Image:
    """A product's print at canvas size (SPRITE) upscaled to the drawing size (N)."""
    if kind == "solid":
        img = Image.new("RGB", (SPRITE, SPRITE), c1)
    elif kind == "stripes":
        ang = pick(rng, (0.0, 90.0, 45.0, 135.0, 0.0, 90.0)) * math.pi / 180
        period = u(rng, 7, 26)
        duty = u(rng, 0.25, 0.6)
        t = (_XX * math.cos(ang) + _YY * math.sin(ang)) / period
        img = _two((t - np.floor(t)) < duty, c1, c2)
    elif kind == "dots":
        s = u(rng, 9, 24)
        r = s * u(rng, 0.16, 0.34)
        stagger = rng.random() < 0.5
        yy = _YY / s
        row = np.floor(yy)
        xx = _XX / s + (0.5 * (row % 2) if stagger else 0.0)
        d2 = ((xx - np.floor(xx) - 0.5) * s) ** 2 + ((yy - row - 0.5) * s) ** 2
        img = _two(d2 < r * r, c1, c2)
    elif kind == "checker":
        s = u(rng, 8, 22)
        if rng.random() < 0.3:
            a, b = (_XX + _YY) / (s * 1.4), (_XX - _YY) / (s * 1.4)
        else:
            a, b = _XX / s, _YY / s
        img = _two((np.floor(a) + np.floor(b)) % 2 == 1, c1, c2)
    elif kind == "gradient":
        ang = u(rng, 0, 2 * math.pi)
        t = (_XX - 128) * math.cos(ang) + (_YY - 128) * math.sin(ang)
        t = np.clip(t / 180 + 0.5, 0, 1)
        img = _two(t, c1, c2)
    elif kind == "plaid":
        p1, p2 = u(rng, 18, 40), u(rng, 5, 10)
        a = ((_XX % p1) < p1 * 0.35).astype(np.float32) * 0.55 + ((_YY % p1) < p1 * 0.35) * 0.45
        b = ((_XX % p2) < 1.6) | ((_YY % p2) < 1.6)
        base = _two(np.clip(a, 0, 1), c1, c2)
        img = Image.composite(Image.new("RGB", base.size, c3), base, Image.fromarray((b * 110).astype(np.uint8), "L"))
    elif kind == "chevron":
        period, amp = u(rng, 12, 28), u(rng, 5, 14)
        zig = np.abs(((_XX / (2 * amp)) % 2) - 1) * amp
        t = (_YY + zig) / period
        img = _two((t - np.floor(t)) < 0.5, c1, c2)
    elif kind == "bands":
        k = int(rng.integers(2, 5))
        edges = np.sort(rng.uniform(0, SPRITE, size=k))
        idx = np.searchsorted(edges, _YY[:, 0])
        cols = np.array([c1, c2, c3], np.uint8)[idx % 3]
        img = Image.fromarray(np.repeat(cols[:, None, :], SPRITE, axis=1), "RGB")
    elif kind == "speckle":
        img = Image.new("RGB", (SPRITE, SPRITE), c1)
        d = ImageDraw.Draw(img)
        count = int(rng.integers(60, 160))
        pts = rng.uniform(0, SPRITE, size=(count, 2))
        rad = rng.uniform(1.0, u(rng, 2.0, 5.0), size=count)
        colsel = rng.random(count)
        for (x, y), r, c in zip(pts, rad, colsel):
            d.ellipse((x - r, y - r, x + r, y + r), fill=c2 if c < 0.65 else c3)
    else:
        raise ValueError(kind)
    return img.resize((N, N), Image.Resampling.NEAREST)


# ----------------------------------------------------------------------------- palette


class Palette:
    """A product's colours: primary, secondary, accent, a neutral, and its print."""

    def __init__(self, rng: np.random.Generator) -> None:
        h = rng.random()
        s = u(rng, 0.25, 0.95) if rng.random() < 0.85 else u(rng, 0.0, 0.12)
        v = u(rng, 0.3, 0.95)
        self.primary = hsv(h, s, v)
        scheme = rng.random()
        if scheme < 0.35:  # complementary
            h2 = h + 0.5 + u(rng, -0.08, 0.08)
        elif scheme < 0.7:  # analogous
            h2 = h + u(rng, 0.06, 0.16) * (1 if rng.random() < 0.5 else -1)
        else:  # anything
            h2 = rng.random()
        v2 = v + u(rng, 0.25, 0.5) * (1 if v < 0.6 else -1)
        self.secondary = hsv(h2, u(rng, 0.1, 0.9), v2) if rng.random() < 0.75 else (
            (244, 242, 236) if v < 0.6 else (30, 30, 34))
        self.accent = hsv(rng.random(), u(rng, 0.5, 1.0), u(rng, 0.5, 1.0))
        self.neutral_name = pick(rng, tuple(NEUTRALS))
        self.neutral = NEUTRALS[self.neutral_name]
        self.pattern = str(rng.choice(PATTERNS, p=np.asarray(PATTERN_WEIGHTS) / sum(PATTERN_WEIGHTS)))
        self.light = u(rng, -1, 1)
        self.texture = pattern_texture(self.pattern, rng, self.primary, self.secondary, self.accent)
        self.dark = shade(self.primary, 0.6)


# ----------------------------------------------------------------------------- drawers
# Each drawer: (sprite, rng, palette, pose) -> None. Canvas coordinates in [0, 1];
# objects stand on y ≈ 0.86 and are roughly centred on x = 0.5.


def mug(sp: Sprite, r, pal: Palette, pose: float) -> None:
    w, h = u(r, 0.34, 0.48), u(r, 0.36, 0.52)
    hs, ht = u(r, 0.45, 0.75) * h, u(r, 0.03, 0.055)
    square_handle = r.random() < 0.3
    band = r.random() < 0.45
    band_y, band_h = u(r, 0.15, 0.7), u(r, 0.05, 0.14)
    handle_col = pal.primary if r.random() < 0.6 else pal.secondary
    x0 = 0.5 - w / 2 - 0.05
    x1, y1 = x0 + w, 0.86
    y0 = y1 - h
    hy0 = y0 + (h - hs) / 2 - 0.01
    reach = hs * 0.62 * (1.0 - 0.55 * pose)
    hb = (x1 - reach * 0.8, hy0, x1 + reach, hy0 + hs)
    if square_handle:
        sp.rect(hb, handle_col, r=0.03, ring=True, width=ht)
    else:
        sp.ellipse(hb, handle_col, ring=True, width=ht)
    sp.rect((x0, y0, x1, y1), pal.texture, r=0.05 * w)
    if band:
        by = y0 + band_y * h
        sp.rect((x0, by, x1, by + band_h * h), pal.accent)
    sp.ellipse((x0, y0 - 0.028, x1, y0 + 0.028), shade(pal.primary, 0.5))
    sp.ellipse((x0 + 0.012, y0 - 0.02, x1 - 0.012, y0 + 0.02), shade(pal.secondary, 0.55))


def bottle(sp: Sprite, r, pal: Palette, pose: float) -> None:
    bw, bh = u(r, 0.18, 0.3), u(r, 0.34, 0.48)
    sh, nw, nh = u(r, 0.04, 0.12), u(r, 0.06, 0.11), u(r, 0.05, 0.13)
    ch = u(r, 0.04, 0.09)
    label = r.random() < 0.6
    ly, lh = u(r, 0.2, 0.55), u(r, 0.18, 0.35)
    ribs = int(r.integers(0, 6))
    cap = pal.accent if r.random() < 0.6 else pal.neutral
    x0, y1 = 0.5 - bw / 2, 0.88
    y0 = y1 - bh
    sp.rect((x0, y0, x0 + bw, y1), pal.texture, r=0.04)
    sp.poly([(x0, y0 + 0.01), (0.5 - nw / 2, y0 - sh), (0.5 + nw / 2, y0 - sh), (x0 + bw, y0 + 0.01)], pal.texture)
    sp.rect((0.5 - nw / 2, y0 - sh - nh, 0.5 + nw / 2, y0 - sh + 0.005), pal.texture)
    cy = y0 - sh - nh
    sp.rect((0.5 - nw / 2 - 0.008, cy - ch, 0.5 + nw / 2 + 0.008, cy + 0.004), cap, r=0.01)
    for i in range(ribs):
        yy = cy - ch + (i + 1) * ch / (ribs + 1)
        sp.line([(0.5 - nw / 2, yy), (0.5 + nw / 2, yy)], shade(cap, 0.7), 0.004)
    if label:
        ty = y0 + ly * bh
        sp.rect((x0, ty, x0 + bw, ty + lh * bh), pal.secondary)
        sp.rect((x0 + bw * 0.25, ty + lh * bh * 0.35, x0 + bw * 0.75, ty + lh * bh * 0.6), pal.accent)


def chair(sp: Sprite, r, pal: Palette, pose: float) -> None:
    sw, sy = u(r, 0.34, 0.5), u(r, 0.52, 0.6)
    bh, lw = u(r, 0.26, 0.38), u(r, 0.018, 0.035)
    style = pick(r, ("solid", "slats", "rounded", "ladder"))
    frame = pal.neutral if r.random() < 0.6 else pal.dark
    cushion = r.random() < 0.6
    depth = 0.05 + 0.07 * pose
    x0, x1 = 0.5 - sw / 2, 0.5 + sw / 2
    floor = 0.9
    for dx in (depth * 0.7, sw - lw + depth * 0.7):  # back legs
        sp.rect((x0 + dx, sy, x0 + dx + lw, floor - 0.04), shade(frame, 0.75))
    top = sy - bh
    bx0, bx1 = x0 + depth * 0.7, x1 + depth * 0.7
    if style == "solid":
        sp.rect((bx0, top, bx1, sy), pal.texture, r=0.01)
    elif style == "rounded":
        sp.rect((bx0, top, bx1, sy), pal.texture, r=0.08)
    else:
        sp.rect((bx0, top, bx0 + lw * 1.4, sy), frame)
        sp.rect((bx1 - lw * 1.4, top, bx1, sy), frame)
        n = 3 if style == "ladder" else 5
        for i in range(n):
            if style == "ladder":
                yy = top + (i + 0.3) * bh / (n + 0.5)
                sp.rect((bx0, yy, bx1, yy + bh * 0.12), pal.texture)
            else:
                xx = bx0 + (i + 1) * (bx1 - bx0) / (n + 1)
                sp.rect((xx - lw * 0.6, top, xx + lw * 0.6, sy), pal.texture)
        sp.rect((bx0, top, bx1, top + bh * 0.14), pal.texture)
    sp.poly([(x0, sy + 0.04), (x0 + depth, sy - 0.03), (x1 + depth, sy - 0.03), (x1, sy + 0.04)],
            shade(pal.primary, 0.85) if cushion else frame)
    sp.rect((x0, sy + 0.04, x1, sy + 0.075), pal.texture if cushion else shade(frame, 0.8))
    for dx in (0.0, sw - lw):  # front legs
        sp.rect((x0 + dx, sy + 0.07, x0 + dx + lw, floor), frame)


def table(sp: Sprite, r, pal: Palette, pose: float) -> None:
    tw, th = u(r, 0.6, 0.8), u(r, 0.3, 0.45)
    thick = u(r, 0.025, 0.06)
    round_top = r.random() < 0.3
    legs = pick(r, ("four", "pedestal", "trestle", "hairpin"))
    top_fill = pal.texture if r.random() < 0.6 else pal.neutral
    leg_col = pal.neutral if r.random() < 0.5 else pal.dark
    depth = 0.06 + 0.08 * pose
    x0, x1 = 0.5 - tw / 2, 0.5 + tw / 2
    floor = 0.88
    ty = floor - th
    if legs == "four":
        lw = u(r, 0.02, 0.04)
        for lx in (x0 + 0.03 + depth, x1 - 0.03 - lw + depth * 0.4):
            sp.rect((lx, ty, lx + lw, floor - depth * 0.6), shade(leg_col, 0.7))
        for lx in (x0 + 0.03, x1 - 0.03 - lw):
            sp.rect((lx, ty, lx + lw, floor), leg_col)
    elif legs == "pedestal":
        sp.rect((0.47, ty, 0.53, floor - 0.02), leg_col)
        sp.ellipse((0.5 - tw * 0.25, floor - 0.04, 0.5 + tw * 0.25, floor + 0.005), shade(leg_col, 0.85))
    elif legs == "trestle":
        for lx in (x0 + 0.06, x1 - 0.1):
            sp.poly([(lx, ty), (lx + 0.04, ty), (lx + 0.07, floor), (lx - 0.03, floor)], leg_col)
        sp.rect((x0 + 0.08, floor - th * 0.45, x1 - 0.08, floor - th * 0.4), leg_col)
    else:
        for lx in (x0 + 0.06, x1 - 0.06):
            sp.line([(lx - 0.03, ty), (lx, floor), (lx + 0.03, ty)], leg_col, 0.008)
    if round_top:
        sp.ellipse((x0, ty - depth - 0.02, x1, ty + 0.02), top_fill)
        sp.rect((x0, ty - (depth + 0.04) / 2 + 0.01, x1, ty - (depth + 0.04) / 2 + 0.01 + thick), shade(pal.primary, 0.7))
        sp.ellipse((x0, ty - depth - 0.02, x1, ty + 0.02 - thick * 0.2), top_fill)
    else:
        sp.poly([(x0, ty), (x0 + depth, ty - depth), (x1 + depth * 0.4, ty - depth), (x1, ty)], top_fill)
        sp.rect((x0, ty, x1, ty + thick), shade(pal.primary, 0.7) if top_fill is pal.texture else shade(pal.neutral, 0.75))


def lamp(sp: Sprite, r, pal: Palette, pose: float) -> None:
    top_w, bot_w, sh = u(r, 0.14, 0.3), u(r, 0.3, 0.5), u(r, 0.18, 0.3)
    stem_h = u(r, 0.22, 0.36)
    base_w, base_h = u(r, 0.16, 0.3), u(r, 0.03, 0.08)
    arm = r.random() < 0.3
    metal = pal.neutral if r.random() < 0.7 else pal.accent
    floor = 0.9
    sp.ellipse((0.5 - base_w / 2, floor - base_h, 0.5 + base_w / 2, floor), metal)
    stem_top = floor - base_h - stem_h
    if arm:
        sp.line([(0.5, floor - base_h), (0.42, stem_top + stem_h * 0.5), (0.5, stem_top)], metal, 0.014)
    else:
        sp.rect((0.488, stem_top, 0.512, floor - base_h * 0.5), metal)
    sy1 = stem_top + 0.02
    sy0 = sy1 - sh
    sp.poly([(0.5 - top_w / 2, sy0), (0.5 + top_w / 2, sy0), (0.5 + bot_w / 2, sy1), (0.5 - bot_w / 2, sy1)], pal.texture)
    sp.rect((0.5 - bot_w / 2, sy1 - 0.012, 0.5 + bot_w / 2, sy1), pal.accent)
    sp.ellipse((0.49, sy0 - 0.03, 0.51, sy0), metal)


def sofa(sp: Sprite, r, pal: Palette, pose: float) -> None:
    sw, sh = u(r, 0.7, 0.86), u(r, 0.28, 0.38)
    arm_w, back_h = u(r, 0.05, 0.1), u(r, 0.12, 0.2)
    n_cush = int(r.integers(2, 4))
    pillows = int(r.integers(0, 3))
    leg_col = pal.neutral
    depth = 0.03 + 0.05 * pose
    x0, x1 = 0.5 - sw / 2, 0.5 + sw / 2
    floor = 0.84
    y_seat = floor - sh * 0.45
    for lx in (x0 + 0.03, x1 - 0.05):
        sp.rect((lx, floor - 0.02, lx + 0.02, floor + 0.03), leg_col)
    sp.rect((x0 + arm_w * 0.6 + depth, y_seat - back_h - sh * 0.3, x1 - arm_w * 0.6 + depth, y_seat + 0.02),
            shade(pal.primary, 0.8), r=0.03)
    sp.rect((x0, y_seat, x1, floor), pal.texture, r=0.02)
    cw = (sw - 2 * arm_w) / n_cush
    for i in range(n_cush):
        cx = x0 + arm_w + i * cw
        sp.rect((cx + 0.004, y_seat - 0.035, cx + cw - 0.004, y_seat + 0.03), pal.texture, r=0.02)
    for ax in (x0, x1 - arm_w):
        sp.rect((ax, y_seat - sh * 0.25, ax + arm_w, floor), shade(pal.primary, 0.9), r=0.025)
    for i in range(pillows):
        px = x0 + arm_w + 0.02 + i * (sw - 2 * arm_w - 0.16)
        sp.rect((px, y_seat - back_h * 0.9, px + 0.12, y_seat - 0.02), pal.accent, r=0.02)


def shoes(sp: Sprite, r, pal: Palette, pose: float) -> None:
    length, height = u(r, 0.62, 0.8), u(r, 0.16, 0.34)
    sole_h = u(r, 0.03, 0.07)
    toe_cap = r.random() < 0.5
    laces = int(r.integers(3, 7))
    sole_col = pal.neutral if r.random() < 0.6 else pal.secondary
    swoosh = r.random() < 0.55
    x0, x1 = 0.5 - length / 2, 0.5 + length / 2
    floor = 0.8
    base = floor - sole_h
    top = base - height
    tongue_x = x0 + length * (0.34 + 0.04 * pose)
    vamp_x = x0 + length * 0.64
    vamp_y = base - height * 0.42
    upper = [(x0 + 0.01, base), (x0, top + height * 0.3), (x0 + 0.02, top), (x0 + length * 0.12, top + 0.03),
             (tongue_x - 0.03, top + 0.02), (tongue_x, top - 0.015), (tongue_x + 0.03, top),
             (vamp_x, vamp_y), (x1 - 0.07, base - height * 0.34), (x1 - 0.015, base - height * 0.2),
             (x1, base - 0.01), (x1 - 0.01, base)]
    sp.poly(upper, pal.texture)
    sp.poly([(x0 + length * 0.1, top + 0.035), (tongue_x - 0.03, top + 0.025), (tongue_x - 0.01, top + 0.05),
             (x0 + length * 0.12, top + 0.055)], shade(pal.primary, 0.35))
    if toe_cap:
        sp.chord((x1 - length * 0.26, base - height * 0.42, x1 + 0.01, base + 0.04), 180, 360, pal.secondary)
    sp.rect((x0 - 0.005, base, x1 + 0.01, floor), sole_col, r=sole_h / 2)
    lace_col = pal.accent if r.random() < 0.5 else (240, 240, 240)
    for i in range(laces):
        t = (i + 0.5) / laces
        lx = tongue_x + 0.02 + t * (vamp_x - tongue_x - 0.04)
        ly = top + 0.01 + t * (vamp_y - top - 0.02)
        sp.line([(lx - 0.018, ly - 0.016), (lx + 0.018, ly + 0.016)], lace_col, 0.009)
    if swoosh:
        sp.line([(x0 + 0.05, base - height * 0.25), (0.5, base - height * 0.12),
                 (x1 - length * 0.22, base - height * 0.3)], pal.accent, 0.018)


def backpack(sp: Sprite, r, pal: Palette, pose: float) -> None:
    w, h = u(r, 0.4, 0.56), u(r, 0.56, 0.72)
    pocket_h = u(r, 0.25, 0.45)
    pocket_fill = pal.secondary if r.random() < 0.5 else pal.texture
    straps = r.random() < 0.7
    x0, y1 = 0.5 - w / 2, 0.9
    y0 = y1 - h
    sp.arc((0.44, y0 - 0.07, 0.56, y0 + 0.05), 180, 360, pal.neutral, 0.016)
    if straps:
        side = 0.035 * (1 - pose)
        sp.rect((x0 - side - 0.02, y0 + 0.08, x0 + 0.01, y1 - 0.08), shade(pal.primary, 0.6), r=0.02)
        sp.rect((x0 + w - 0.01, y0 + 0.08, x0 + w + side * 0.4 + 0.02, y1 - 0.08), shade(pal.primary, 0.6), r=0.02)
    sp.rect((x0, y0, x0 + w, y1), pal.texture, r=min(w, h) * 0.3)
    py0 = y1 - pocket_h * h
    sp.rect((x0 + w * 0.12, py0, x0 + w * 0.88, y1 - 0.02), pocket_fill, r=0.05)
    sp.arc((x0 + 0.03, y0 + 0.02, x0 + w - 0.03, y0 + h * 0.6), 190, 350, pal.accent, 0.007)
    sp.line([(x0 + w * 0.16, py0 + 0.025), (x0 + w * 0.84, py0 + 0.025)], pal.accent, 0.007)
    sp.rect((0.5 - 0.02, py0 + 0.035, 0.5 + 0.02, py0 + 0.075), pal.neutral, r=0.008)


def book(sp: Sprite, r, pal: Palette, pose: float) -> None:
    w, h = u(r, 0.42, 0.56), u(r, 0.6, 0.76)
    emblem = pick(r, ("circle", "triangle", "diamond", "star", "bars"))
    ty, band = u(r, 0.12, 0.6), u(r, 0.08, 0.18)
    ex, ey, es = u(r, 0.35, 0.65), u(r, 0.45, 0.8), u(r, 0.12, 0.24)
    spine_w = 0.03 + 0.09 * pose
    x0, y1 = 0.5 - w / 2 + spine_w / 2, 0.88
    y0 = y1 - h
    sp.poly([(x0 - spine_w, y0 + 0.015), (x0, y0), (x0, y1), (x0 - spine_w, y1 - 0.015)], pal.dark)
    sp.rect((x0, y0, x0 + w, y1), pal.texture)
    sp.rect((x0 + w, y0 + 0.01, x0 + w + 0.012, y1 - 0.005), (236, 230, 214))
    by = y0 + ty * h
    sp.rect((x0, by, x0 + w, by + band * h), pal.secondary)
    sp.rect((x0 + w * 0.2, by + band * h * 0.35, x0 + w * 0.8, by + band * h * 0.65), pal.accent)
    cx, cy, s = x0 + ex * w, y0 + ey * h, es * w
    if emblem == "circle":
        sp.ellipse((cx - s, cy - s, cx + s, cy + s), pal.accent)
    elif emblem == "triangle":
        sp.poly([(cx, cy - s), (cx + s, cy + s * 0.8), (cx - s, cy + s * 0.8)], pal.accent)
    elif emblem == "diamond":
        sp.poly([(cx, cy - s), (cx + s * 0.7, cy), (cx, cy + s), (cx - s * 0.7, cy)], pal.accent)
    elif emblem == "star":
        pts = [(cx + (s if k % 2 == 0 else s * 0.45) * math.sin(k * math.pi / 5),
                cy - (s if k % 2 == 0 else s * 0.45) * math.cos(k * math.pi / 5)) for k in range(10)]
        sp.poly(pts, pal.accent)
    else:
        for k in range(3):
            sp.rect((cx - s, cy - s + k * s * 0.7, cx + s, cy - s + k * s * 0.7 + s * 0.35), pal.accent)


def vase(sp: Sprite, r, pal: Palette, pose: float) -> None:
    h, rmax = u(r, 0.5, 0.72), u(r, 0.12, 0.22)
    rneck, rfoot, rlip = u(r, 0.04, 0.09), u(r, 0.06, 0.12), u(r, 0.05, 0.12)
    bulge = u(r, 0.25, 0.65)
    sharp = u(r, 1.0, 3.0)
    y1 = 0.9
    y0 = y1 - h
    ts = np.linspace(0, 1, 36)

    def radius(t: float) -> float:  # t=0 top lip, t=1 foot
        body = rmax * math.exp(-((t - bulge) ** 2) * sharp * 4)
        neck = rneck + (rlip - rneck) * max(0.0, 1 - t / 0.12) ** 2
        foot = rfoot * t ** 3
        return max(neck, body, foot, 0.02)

    right = [(0.5 + radius(t), y0 + t * h) for t in ts]
    left = [(0.5 - radius(t), y0 + t * h) for t in ts[::-1]]
    sp.poly(right + left, pal.texture)
    sp.ellipse((0.5 - rlip, y0 - 0.015, 0.5 + rlip, y0 + 0.015), shade(pal.primary, 0.45))
    if r.random() < 0.5:
        by = y0 + h * u(r, 0.15, 0.3)
        sp.rect((0.5 - radius((by - y0) / h) - 0.005, by, 0.5 + radius((by - y0) / h) + 0.005, by + 0.018), pal.accent)


def clock(sp: Sprite, r, pal: Palette, pose: float) -> None:
    rad = u(r, 0.3, 0.4)
    square = r.random() < 0.25
    rim = u(r, 0.025, 0.07)
    face = (246, 244, 238) if r.random() < 0.6 else pal.secondary
    ticks = pick(r, ("lines", "dots", "four", "all"))
    hour, minute = float(r.integers(0, 12)), float(r.integers(0, 60))
    cx, cy = 0.5, 0.5
    box = (cx - rad, cy - rad, cx + rad, cy + rad)
    if square:
        sp.rect(box, pal.texture, r=0.05)
        sp.rect((cx - rad + rim, cy - rad + rim, cx + rad - rim, cy + rad - rim), face, r=0.03)
    else:
        sp.ellipse(box, pal.texture)
        sp.ellipse((cx - rad + rim, cy - rad + rim, cx + rad - rim, cy + rad - rim), face)
    ink = (30, 30, 32) if sum(face) > 380 else (240, 240, 240)
    inner = rad - rim - 0.02
    for k in range(12):
        if ticks == "four" and k % 3:
            continue
        a = k * math.pi / 6
        sx, sy = math.sin(a), -math.cos(a)
        if ticks == "dots":
            d = 0.012 if k % 3 else 0.02
            sp.ellipse((cx + sx * inner * 0.88 - d, cy + sy * inner * 0.88 - d, cx + sx * inner * 0.88 + d,
                        cy + sy * inner * 0.88 + d), ink)
        else:
            ln = 0.12 if (k % 3 == 0 or ticks == "all") else 0.07
            sp.line([(cx + sx * inner, cy + sy * inner), (cx + sx * inner * (1 - ln * 1.5), cy + sy * inner * (1 - ln * 1.5))],
                    ink, 0.01 if k % 3 == 0 else 0.006)
    ha = (hour + minute / 60) * math.pi / 6
    ma = minute * math.pi / 30
    sp.line([(cx, cy), (cx + math.sin(ha) * inner * 0.5, cy - math.cos(ha) * inner * 0.5)], ink, 0.018)
    sp.line([(cx, cy), (cx + math.sin(ma) * inner * 0.8, cy - math.cos(ma) * inner * 0.8)], ink, 0.011)
    sp.ellipse((cx - 0.018, cy - 0.018, cx + 0.018, cy + 0.018), pal.accent)


def headphones(sp: Sprite, r, pal: Palette, pose: float) -> None:
    span, band_w = u(r, 0.44, 0.6), u(r, 0.025, 0.05)
    cup_w, cup_h = u(r, 0.1, 0.16), u(r, 0.16, 0.26)
    oval = r.random() < 0.5
    band_col = pal.neutral if r.random() < 0.5 else pal.primary
    top, bottom = 0.14, 0.76
    x0, x1 = 0.5 - span / 2, 0.5 + span / 2
    sp.arc((x0, top, x1, top + (bottom - top) * 1.1), 180, 360, band_col, band_w)
    ymid = top + (bottom - top) * 0.55
    sp.rect((x0 - band_w / 2, ymid - 0.02, x0 + band_w / 2, ymid + 0.12), pal.neutral)
    sp.rect((x1 - band_w / 2, ymid - 0.02, x1 + band_w / 2, ymid + 0.12), pal.neutral)
    shift = 0.04 * pose
    for side, cx in ((-1, x0), (1, x1)):
        scale = 1 - 0.3 * pose if side > 0 else 1.0
        cw, chh = cup_w * scale, cup_h * scale
        cx = cx - shift * side
        box = (cx - cw / 2, ymid + 0.08, cx + cw / 2, ymid + 0.08 + chh)
        if oval:
            sp.ellipse(box, pal.texture)
        else:
            sp.rect(box, pal.texture, r=cw * 0.3)
        inset = cw * 0.22
        cushion = (box[0] + (inset if side > 0 else 0), box[1] + 0.02, box[2] - (0 if side > 0 else inset), box[3] - 0.02)
        sp.rect(cushion, shade(pal.secondary, 0.7), r=cw * 0.2)
        sp.ellipse((cx - cw * 0.12, box[1] + chh * 0.4, cx + cw * 0.12, box[1] + chh * 0.6), pal.accent)


def pillow(sp: Sprite, r, pal: Palette, pose: float) -> None:
    w, h = u(r, 0.56, 0.76), u(r, 0.46, 0.66)
    sag = u(r, 0.015, 0.05)
    piping = r.random() < 0.5
    button = r.random() < 0.3
    tassels = r.random() < 0.25
    x0, y0 = 0.5 - w / 2, 0.52 - h / 2
    x1, y1 = x0 + w, y0 + h
    pts = []
    for t in np.linspace(0, 1, 9):
        pts.append((x0 + t * w, y0 + sag * math.sin(math.pi * t)))
    for t in np.linspace(0, 1, 9)[1:]:
        pts.append((x1 - sag * math.sin(math.pi * t), y0 + t * h))
    for t in np.linspace(0, 1, 9)[1:]:
        pts.append((x1 - t * w, y1 - sag * math.sin(math.pi * t)))
    for t in np.linspace(0, 1, 9)[1:-1]:
        pts.append((x0 + sag * math.sin(math.pi * t), y1 - t * h))
    sp.poly(pts, pal.texture)
    if piping:
        sp.line(pts + [pts[0]], pal.accent, 0.012)
    if button:
        sp.ellipse((0.5 - 0.025, 0.52 - 0.025, 0.5 + 0.025, 0.52 + 0.025), shade(pal.accent, 0.8))
    if tassels:
        for (tx, ty) in ((x0, y0), (x1, y0), (x0, y1), (x1, y1)):
            sp.ellipse((tx - 0.025, ty - 0.025, tx + 0.025, ty + 0.025), pal.accent)


def bowl(sp: Sprite, r, pal: Palette, pose: float) -> None:
    w, d = u(r, 0.52, 0.76), u(r, 0.18, 0.32)
    foot_w, foot_h = u(r, 0.2, 0.4) * w, u(r, 0.015, 0.04)
    rim_h = u(r, 0.06, 0.12) + 0.04 * pose
    inside = shade(pal.secondary, 0.85) if r.random() < 0.6 else shade(pal.primary, 0.7)
    band = r.random() < 0.5
    rim_y = 0.86 - foot_h - d
    sp.rect((0.5 - foot_w / 2, 0.86 - foot_h - 0.01, 0.5 + foot_w / 2, 0.86), shade(pal.primary, 0.75))
    sp.chord((0.5 - w / 2, rim_y - d, 0.5 + w / 2, rim_y + d), 0, 180, pal.texture)
    sp.ellipse((0.5 - w / 2, rim_y - rim_h / 2, 0.5 + w / 2, rim_y + rim_h / 2), shade(pal.primary, 0.9))
    sp.ellipse((0.5 - w / 2 + 0.015, rim_y - rim_h / 2 + 0.008, 0.5 + w / 2 - 0.015, rim_y + rim_h / 2 - 0.004), inside)
    if band:
        sp.arc((0.5 - w / 2 + 0.01, rim_y - d + 0.04, 0.5 + w / 2 - 0.01, rim_y + d - 0.04), 10, 170, pal.accent, 0.012)


def phone_case(sp: Sprite, r, pal: Palette, pose: float) -> None:
    w = u(r, 0.3, 0.38)
    h = w * u(r, 1.9, 2.15)
    h = min(h, 0.8)
    cam = pick(r, ("square", "strip", "circle", "triple"))
    logo = pick(r, ("none", "circle", "heart", "bars", "diamond"))
    side = 0.012 + 0.03 * pose
    x0, y0 = 0.5 - w / 2, 0.5 - h / 2
    x1, y1 = x0 + w, y0 + h
    sp.rect((x1 - 0.02, y0 + 0.01, x1 + side, y1 - 0.01), shade(pal.primary, 0.55), r=0.04)
    sp.rect((x0, y0, x1, y1), pal.texture, r=w * 0.16)
    sp.rect((x1 + side - 0.006, y0 + h * 0.22, x1 + side + 0.004, y0 + h * 0.32), pal.neutral)
    lens = (28, 28, 30)
    if cam == "square":
        sp.rect((x0 + 0.03, y0 + 0.03, x0 + 0.03 + w * 0.42, y0 + 0.03 + w * 0.42), shade(pal.primary, 0.7), r=0.03)
        for (a, b) in ((0.1, 0.1), (0.1, 0.26), (0.26, 0.18)):
            sp.ellipse((x0 + 0.03 + w * a, y0 + 0.03 + w * b, x0 + 0.03 + w * (a + 0.13), y0 + 0.03 + w * (b + 0.13)), lens)
    elif cam == "strip":
        sp.rect((x0 + 0.025, y0 + 0.03, x1 - 0.025, y0 + 0.03 + w * 0.22), lens, r=0.02)
    elif cam == "circle":
        sp.ellipse((0.5 - w * 0.2, y0 + 0.03, 0.5 + w * 0.2, y0 + 0.03 + w * 0.4), lens)
    else:
        for k in range(3):
            sp.ellipse((x0 + 0.03, y0 + 0.03 + k * w * 0.17, x0 + 0.03 + w * 0.14, y0 + 0.03 + k * w * 0.17 + w * 0.14), lens)
    cx, cy, s = 0.5, y0 + h * 0.55, w * 0.16
    if logo == "circle":
        sp.ellipse((cx - s, cy - s, cx + s, cy + s), pal.accent)
    elif logo == "heart":
        sp.ellipse((cx - s, cy - s * 0.6, cx, cy + s * 0.2), pal.accent)
        sp.ellipse((cx, cy - s * 0.6, cx + s, cy + s * 0.2), pal.accent)
        sp.poly([(cx - s, cy - s * 0.1), (cx + s, cy - s * 0.1), (cx, cy + s)], pal.accent)
    elif logo == "bars":
        for k in range(3):
            sp.rect((cx - s, cy - s + k * s * 0.75, cx + s, cy - s + k * s * 0.75 + s * 0.35), pal.accent)
    elif logo == "diamond":
        sp.poly([(cx, cy - s), (cx + s * 0.7, cy), (cx, cy + s), (cx - s * 0.7, cy)], pal.accent)


def rug(sp: Sprite, r, pal: Palette, pose: float) -> None:
    w = u(r, 0.5, 0.66)
    h = min(0.82, w * u(r, 1.3, 1.6))
    border = u(r, 0.03, 0.08)
    medal = pick(r, ("diamond", "ellipse", "none", "grid"))
    fringe = r.random() < 0.6
    x0, y0 = 0.5 - w / 2, 0.5 - h / 2
    x1, y1 = x0 + w, y0 + h
    if fringe:
        for k in range(18):
            fx = x0 + 0.01 + k * (w - 0.02) / 17
            sp.line([(fx, y0 - 0.035), (fx, y0)], (232, 226, 208), 0.006)
            sp.line([(fx, y1), (fx, y1 + 0.035)], (232, 226, 208), 0.006)
    sp.rect((x0, y0, x1, y1), pal.secondary)
    sp.rect((x0 + border, y0 + border, x1 - border, y1 - border), pal.texture)
    sp.rect((x0 + border * 0.4, y0 + border * 0.4, x1 - border * 0.4, y1 - border * 0.4), pal.accent, ring=True,
            width=max(0.006, border * 0.15))
    cx, cy = 0.5, 0.5
    mw, mh = (w - 2 * border) * 0.3, (h - 2 * border) * 0.22
    if medal == "diamond":
        sp.poly([(cx, cy - mh), (cx + mw, cy), (cx, cy + mh), (cx - mw, cy)], pal.accent)
        sp.poly([(cx, cy - mh * 0.5), (cx + mw * 0.5, cy), (cx, cy + mh * 0.5), (cx - mw * 0.5, cy)], pal.secondary)
    elif medal == "ellipse":
        sp.ellipse((cx - mw, cy - mh, cx + mw, cy + mh), pal.accent)
    elif medal == "grid":
        for k in range(1, 4):
            yy = y0 + border + k * (h - 2 * border) / 4
            sp.line([(x0 + border, yy), (x1 - border, yy)], pal.accent, 0.008)


# type name → (drawer, shading, glossy highlight, pose changes the drawing)
DRAWERS: dict[str, tuple[Callable, str, bool, bool]] = {
    "MUG": (mug, "cyl", True, True),
    "BOTTLE": (bottle, "cyl", True, False),
    "CHAIR": (chair, "flat", False, True),
    "TABLE": (table, "flat", False, True),
    "LAMP": (lamp, "cyl", False, False),
    "SOFA": (sofa, "flat", False, True),
    "SHOES": (shoes, "flat", False, True),
    "BACKPACK": (backpack, "cyl", False, True),
    "BOOK": (book, "flat", False, True),
    "VASE": (vase, "cyl", True, False),
    "CLOCK": (clock, "flat", True, False),
    "HEADPHONES": (headphones, "flat", False, True),
    "PILLOW": (pillow, "cyl", False, False),
    "BOWL": (bowl, "cyl", True, True),
    "CELLULAR_PHONE_CASE": (phone_case, "flat", True, True),
    "RUG": (rug, "flat", False, False),
}


def render_product(product_type: str, shape_seed: list[int], pal: Palette, pose: float) -> Image.Image:
    """The product as an RGBA sprite (SPRITE x SPRITE, transparent around it)."""
    drawer, shading, glossy, _ = DRAWERS[product_type]
    sp = Sprite(pal.primary)
    drawer(sp, np.random.default_rng(shape_seed), pal, pose)
    return sp.finish(shading, glossy, pal.light)
