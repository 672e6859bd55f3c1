"""Photo scenes of the built-in sample catalog: a product's sprites placed in a photo.

The main photo is frontal, centred, on white; the other photos change viewpoint
(a homography), lighting, background (solid, gradient, textures from :class:`Banks`, simple
room scenes) and add sensor effects.  Used by ``catalog.sample`` only; draws with Pillow and
numpy and the shape primitives of ``catalog._shapes``.
"""
from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter, ImageOps

from catalog import _shapes as shapes

MAX_SIDE = 256  # longest side of a photo, in pixels



class Banks:
    """Grey textures shared by all photos of one sample (value noise, wood, weave, noise)."""

    SIZE = 320

    def __init__(self, seed: int) -> None:
        rng = np.random.default_rng([seed, 90210])
        n = self.SIZE
        self.noise = [self._value_noise(rng, n) for _ in range(6)]
        yy, xx = np.mgrid[0:n, 0:n].astype(np.float32)
        self.wood = []
        for _ in range(3):
            warp = np.asarray(self._value_noise(rng, n), np.float32) / 255.0
            f = u(rng, 0.05, 0.12)
            rings = 0.5 + 0.5 * np.sin((yy + 40 * warp) * f + 6 * warp)
            self.wood.append(Image.fromarray((rings * 200 + 30).astype(np.uint8), "L"))
        self.weave = []
        for _ in range(2):
            p = u(rng, 4, 9)
            w = 0.5 + 0.25 * np.sin(xx * 2 * math.pi / p) * np.sign(np.sin(yy * math.pi / p)) \
                + 0.25 * np.sin(yy * 2 * math.pi / p) * np.sign(np.cos(xx * math.pi / p))
            self.weave.append(Image.fromarray((np.clip(w, 0, 1) * 255).astype(np.uint8), "L"))
        grain = rng.normal(128, 9, size=(n, n)).clip(0, 255).astype(np.uint8)
        self.grain = Image.fromarray(grain, "L")

    @staticmethod
    def _value_noise(rng: np.random.Generator, n: int) -> Image.Image:
        acc = np.zeros((n, n), np.float32)
        for k, w in ((4, 1.0), (8, 0.6), (16, 0.35), (32, 0.2), (64, 0.1)):
            g = Image.fromarray((rng.random((k, k)) * 255).astype(np.uint8), "L")
            acc += w * np.asarray(g.resize((n, n), Image.Resampling.BICUBIC), np.float32)
        return ImageOps.autocontrast(Image.fromarray((acc / 2.25).clip(0, 255).astype(np.uint8), "L"))

    def crop(self, rng: np.random.Generator, tex: Image.Image, w: int, h: int) -> Image.Image:
        scale = u(rng, 0.6, 1.0)
        cw, ch = max(8, int(w * scale)), max(8, int(h * scale))
        x, y = int(rng.integers(0, self.SIZE - min(cw, self.SIZE) + 1)), int(rng.integers(0, self.SIZE - min(ch, self.SIZE) + 1))
        return tex.resize((w, h), Image.Resampling.BILINEAR, box=(x, y, min(self.SIZE, x + cw), min(self.SIZE, y + ch)))


u = shapes.u


def _muted(rng: np.random.Generator) -> tuple[int, int, int]:
    return shapes.hsv(rng.random(), u(rng, 0.03, 0.45), u(rng, 0.35, 0.97))


def _gradient(rng: np.random.Generator, w: int, h: int, c1, c2) -> Image.Image:
    ang = u(rng, 0, 2 * math.pi)
    gx = (np.arange(w, dtype=np.float32) - w / 2) * math.cos(ang)
    gy = (np.arange(h, dtype=np.float32) - h / 2) * math.sin(ang)
    t = np.add.outer(gy, gx)
    t = (t - t.min()) / max(1e-6, float(t.max() - t.min()))
    return _colorize(Image.fromarray((t * 255).astype(np.uint8), "L"), c1, c2)


def _background(rng: np.random.Generator, w: int, h: int, banks: Banks) -> tuple[Image.Image, str]:
    kind = str(rng.choice(("white", "solid", "gradient", "texture", "scene"), p=(0.24, 0.12, 0.19, 0.18, 0.27)))
    if kind == "white":
        g = int(rng.integers(238, 256))
        return Image.new("RGB", (w, h), (g, g, min(255, g + int(rng.integers(-3, 4))))), kind
    if kind == "solid":
        return Image.new("RGB", (w, h), _muted(rng)), kind
    if kind == "gradient":
        return _gradient(rng, w, h, _muted(rng), _muted(rng)), kind
    if kind == "texture":
        group = banks.noise if rng.random() < 0.5 else (banks.wood if rng.random() < 0.6 else banks.weave)
        tex = banks.crop(rng, shapes.pick(rng, group), w, h)
        c = _muted(rng)
        return _colorize(tex, shapes.shade(c, u(rng, 0.45, 0.8)), shapes.mix(c, (255, 255, 255), u(rng, 0.1, 0.5))), kind
    # a simple room: wall, a table top or floor, a few things around
    wall = _gradient(rng, w, h, _muted(rng), _muted(rng)) if rng.random() < 0.5 else Image.new("RGB", (w, h), _muted(rng))
    horizon = int(h * u(rng, 0.5, 0.8))
    d = ImageDraw.Draw(wall)
    for _ in range(int(rng.integers(0, 3))):
        fx, fy = int(rng.integers(0, w - 20)), int(rng.integers(0, max(1, horizon - 30)))
        fw, fh = int(rng.integers(20, 70)), int(rng.integers(20, 60))
        if rng.random() < 0.5:  # a picture frame
            d.rectangle((fx, fy, fx + fw, fy + fh), fill=_muted(rng), outline=shapes.hsv(0, 0, u(rng, 0.1, 0.9)), width=3)
        else:  # a window
            d.rectangle((fx, fy, fx + fw, fy + fh), fill=(228, 238, 248), outline=(250, 250, 250), width=3)
            d.line((fx + fw // 2, fy, fx + fw // 2, fy + fh), fill=(250, 250, 250), width=2)
    surface = banks.crop(rng, shapes.pick(rng, banks.wood + banks.noise[:2]), w, h - horizon)
    c = _muted(rng)
    wall.paste(_colorize(surface, shapes.shade(c, 0.5), shapes.mix(c, (255, 255, 255), 0.3)), (0, horizon))
    d.line((0, horizon, w, horizon), fill=shapes.shade(c, 0.4), width=2)
    for _ in range(int(rng.integers(0, 3))):  # other objects on the table, at the sides
        ox = int(rng.integers(0, w // 4)) if rng.random() < 0.5 else int(rng.integers(3 * w // 4, w))
        ow, oh = int(rng.integers(12, 40)), int(rng.integers(15, 60))
        col = shapes.hsv(rng.random(), u(rng, 0.2, 0.9), u(rng, 0.3, 0.95))
        if rng.random() < 0.5:
            d.rectangle((ox - ow // 2, horizon + 8 - oh, ox + ow // 2, horizon + 8), fill=col)
        else:
            d.ellipse((ox - ow // 2, horizon + 8 - oh, ox + ow // 2, horizon + 8), fill=col)
    return wall, kind


def _homography(rng: np.random.Generator, bbox, out_w: int, out_h: int) -> tuple[np.ndarray, float]:
    """A random sprite → photo mapping (3x3) for a non-main photo, and its scale."""
    x0, y0, x1, y1 = bbox
    bw, bh = max(1, x1 - x0), max(1, y1 - y0)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    to_center = np.array([[1, 0, -cx], [0, 1, -cy], [0, 0, 1]], np.float64)
    s = min(out_w, out_h) / max(bw, bh) * u(rng, 0.5, 1.08)
    theta = float(np.clip(rng.normal(0, 0.22), -0.55, 0.55))
    shear = u(rng, -0.18, 0.18)
    flip = -1.0 if rng.random() < 0.3 else 1.0
    g, h = u(rng, -0.7, 0.7) / 256, u(rng, -0.7, 0.7) / 256
    persp = np.array([[1, 0, 0], [0, 1, 0], [g, h, 1]], np.float64)
    lin = np.array([[flip * s, shear * s, 0], [0, s * u(rng, 0.85, 1.15), 0], [0, 0, 1]], np.float64)
    rot = np.array([[math.cos(theta), -math.sin(theta), 0], [math.sin(theta), math.cos(theta), 0], [0, 0, 1]])
    tx = out_w / 2 + u(rng, -0.22, 0.22) * out_w
    ty = out_h / 2 + u(rng, -0.22, 0.22) * out_h
    move = np.array([[1, 0, tx], [0, 1, ty], [0, 0, 1]], np.float64)
    return move @ rot @ lin @ persp @ to_center, s


def _warp(sprite: Image.Image, bbox, m: np.ndarray, out_w: int, out_h: int) -> tuple[Image.Image, tuple[int, int]] | None:
    """The sprite mapped by ``m``, cut to where it lands in the photo: (image, offset), or None if outside."""
    x0, y0, x1, y1 = bbox
    corners = m @ np.array([[x0, x1, x1, x0], [y0, y0, y1, y1], [1, 1, 1, 1]], np.float64)
    xs, ys = corners[0] / corners[2], corners[1] / corners[2]
    ox0, oy0 = max(0, int(math.floor(xs.min())) - 1), max(0, int(math.floor(ys.min())) - 1)
    ox1, oy1 = min(out_w, int(math.ceil(xs.max())) + 1), min(out_h, int(math.ceil(ys.max())) + 1)
    if ox1 - ox0 < 2 or oy1 - oy0 < 2:
        return None
    inv = np.linalg.inv(m) @ np.array([[1, 0, ox0], [0, 1, oy0], [0, 0, 1]], np.float64)
    inv = inv / inv[2, 2]
    part = sprite.transform((ox1 - ox0, oy1 - oy0), Image.Transform.PERSPECTIVE, tuple(inv.flatten()[:8].tolist()),
                            Image.Resampling.BILINEAR)
    return part, (ox0, oy0)


def _colorize(grey: Image.Image, dark, light) -> Image.Image:
    t = np.arange(256, dtype=np.float32) / 255.0
    lut = np.concatenate([np.clip(np.rint(a + (b - a) * t), 0, 255) for a, b in zip(dark, light)])
    return grey.convert("RGB").point(lut.astype(np.uint8).tolist())


def _lighting_lut(rng: np.random.Generator) -> list[int]:
    b, c = u(rng, 0.72, 1.22), u(rng, 0.7, 1.25)
    gains = rng.uniform(0.86, 1.14, size=3)
    v = np.arange(256, dtype=np.float32)
    base = ((v - 128) * c + 128) * b
    return np.concatenate([np.clip(base * g, 0, 255) for g in gains]).astype(np.uint8).tolist()


def compose_photo(sprites: list[Image.Image], bboxes: list, rng: np.random.Generator | None, banks: Banks) -> Image.Image:
    """One photo of a product: rng None → the main image (frontal, centred, on white)."""
    if rng is None:
        x0, y0, x1, y1 = bboxes[0]
        aspect = min(1.6, max(0.62, (x1 - x0) / max(1, y1 - y0)))
        w, h = (MAX_SIDE, round(MAX_SIDE / aspect)) if aspect >= 1 else (round(MAX_SIDE * aspect), MAX_SIDE)
        # a pure scale and shift: crop the object and resize it (exact and fast)
        bw, bh = x1 - x0, y1 - y0
        s = 0.86 * min(w / bw, h / bh)
        nw, nh = max(1, round(bw * s)), max(1, round(bh * s))
        obj = sprites[0].resize((nw, nh), Image.Resampling.BILINEAR, box=bboxes[0])
        photo = Image.new("RGB", (w, h), (255, 255, 255))
        photo.paste(obj, ((w - nw) // 2, (h - nh) // 2), obj)
        return photo
    w, h = ((MAX_SIDE, MAX_SIDE), (MAX_SIDE, 192), (192, MAX_SIDE))[int(rng.choice(3, p=(0.5, 0.25, 0.25)))]
    pose = 1 if (len(sprites) > 1 and rng.random() < 0.5) else 0
    m, s = _homography(rng, bboxes[pose], w, h)
    photo, _kind = _background(rng, w, h, banks)
    placed = _warp(sprites[pose], bboxes[pose], m, w, h)
    if rng.random() < 0.6:  # a soft contact shadow under the object
        x0, y0, x1, y1 = bboxes[pose]
        foot = m @ np.array([(x0 + x1) / 2, y1, 1.0])
        fx, fy = foot[0] / foot[2], foot[1] / foot[2]
        rw, rh = (x1 - x0) * s * 0.55, max(3.0, (x1 - x0) * s * 0.08)
        q = 4
        mask = Image.new("L", (w // q, h // q), 0)
        ImageDraw.Draw(mask).ellipse(((fx - rw) / q, (fy - rh) / q, (fx + rw) / q, (fy + rh) / q),
                                     fill=int(rng.integers(60, 130)))
        mask = mask.filter(ImageFilter.BoxBlur(2)).resize((w, h), Image.Resampling.BILINEAR)
        photo.paste((0, 0, 0), (0, 0), mask)
    if placed is not None:
        photo.paste(placed[0], placed[1], placed[0])
    if rng.random() < 0.4:  # light from one side
        g = _gradient(rng, w, h, (int(rng.integers(150, 215)),) * 3, (255, 255, 255))
        photo = ImageChops.multiply(photo, g)
    photo = photo.point(_lighting_lut(rng))
    r = rng.random()
    if r < 0.2:
        k = u(rng, 0.45, 0.8)  # out of focus: down and up again
        photo = photo.resize((max(8, round(w * k)), max(8, round(h * k))), Image.Resampling.BILINEAR).resize(
            (w, h), Image.Resampling.BILINEAR)
    elif r < 0.45:
        grain = banks.crop(rng, banks.grain, w, h)
        photo = ImageChops.add(photo, Image.merge("RGB", (grain, grain, grain)), 1.0, -128)
    return photo


