"""Scenes of coloured shapes, their captions, and their rendering.

A scene is a list of objects (colour, shape, size) with a layout: one object, two objects related by "to the left of"
or "above", or three objects read from left to right. Swapping or changing one attribute gives a *sibling* scene,
the hard negative a pooled embedding confuses and the cross-attention matching head should not.
"""

import math
import random
import re
from dataclasses import dataclass, replace

from PIL import Image, ImageDraw

COLORS = {
    "red": (215, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 200, 30),
    "purple": (140, 60, 180),
    "orange": (240, 130, 30),
}
SHAPES = ("circle", "square", "triangle", "diamond")
SIZES = ("big", "small")
RELATIONS = ("to the left of", "above")

# Colour-shape pairs that never occur in training: the test split is built around them.
HELD_OUT_PAIRS = frozenset({("purple", "triangle"), ("yellow", "circle"), ("green", "square")})


@dataclass(frozen=True)
class SceneObject:
    color: str
    shape: str
    size: str

    def phrase(self) -> str:
        return f"a {self.size} {self.color} {self.shape}"


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]
    relation: str | None = None  # for two objects: objects[0] <relation> objects[1]

    def caption(self) -> str:
        phrases = [item.phrase() for item in self.objects]
        if len(phrases) == 1:
            return phrases[0]
        if len(phrases) == 2:
            return f"{phrases[0]} {self.relation} {phrases[1]}"
        return f"{', '.join(phrases[:-1])} and {phrases[-1]}, from left to right"

    def uses_held_out_pair(self) -> bool:
        return any((item.color, item.shape) in HELD_OUT_PAIRS for item in self.objects)


# What `mirror_axis` returns: no mirror of the image contradicts its caption, a left-right mirror does, an up-down one does.
NO_MIRROR, LEFT_RIGHT_MIRROR, UP_DOWN_MIRROR = 0, 1, 2
# One object's phrase in a caption; `findall` gives (size, colour, shape) per object, in the caption's order.
OBJECT_PHRASE = re.compile(rf"a ({'|'.join(SIZES)}) ({'|'.join(COLORS)}) ({'|'.join(SHAPES)})")


def mirror_axis(caption: str) -> int:
    """Which mirror of a demo scene's image its caption no longer describes: a left-right mirror for "to the left of"
    and "from left to right" (the objects' order reverses), an up-down mirror for "above"; `NO_MIRROR` for one object
    or for objects that read the same reversed (a red circle to the left of a red circle). The mirror image is then a
    hard negative made of the right objects in the wrong arrangement, which in-batch negatives rarely offer."""
    objects = OBJECT_PHRASE.findall(caption)
    if len(objects) < 2 or objects == objects[::-1]:
        return NO_MIRROR
    return UP_DOWN_MIRROR if " above " in caption else LEFT_RIGHT_MIRROR


def random_object(rng: random.Random) -> SceneObject:
    return SceneObject(rng.choice(list(COLORS)), rng.choice(SHAPES), rng.choice(SIZES))


def random_scene(rng: random.Random) -> Scene:
    count = rng.choices((1, 2, 3), weights=(3, 6, 1))[0]
    objects = tuple(random_object(rng) for _ in range(count))
    return Scene(objects, rng.choice(RELATIONS) if count == 2 else None)


def sibling_scene(scene: Scene, rng: random.Random) -> Scene:
    """The same scene with exactly one thing changed: colours swapped, order swapped, or one attribute."""
    objects = list(scene.objects)
    moves = ["attribute"]
    if len(objects) >= 2 and objects[0].color != objects[1].color:
        moves.append("swap_colors")
    if len(objects) >= 2 and objects[0] != objects[1]:
        moves.append("swap_order")
    move = rng.choice(moves)
    if move == "swap_colors":
        objects[0], objects[1] = replace(objects[0], color=objects[1].color), replace(objects[1], color=objects[0].color)
    elif move == "swap_order":
        objects[0], objects[1] = objects[1], objects[0]
    else:
        index = rng.randrange(len(objects))
        field = rng.choice(("color", "shape", "size"))
        choices = {"color": list(COLORS), "shape": SHAPES, "size": SIZES}[field]
        current = getattr(objects[index], field)
        objects[index] = replace(objects[index], **{field: rng.choice([c for c in choices if c != current])})
    return Scene(tuple(objects), scene.relation)


# ---------------------------------------------------------------------------------------------------------- rendering


def _shape_points(shape: str, cx: float, cy: float, radius: float) -> list[tuple[float, float]]:
    if shape == "triangle":
        return [(cx + radius * math.cos(a), cy + radius * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    if shape == "diamond":
        return [(cx, cy - radius), (cx + radius, cy), (cx, cy + radius), (cx - radius, cy)]
    return [(cx - radius, cy - radius), (cx + radius, cy + radius)]


def _draw_object(draw: ImageDraw.ImageDraw, item: SceneObject, cx: float, cy: float, radius: float, outlined: bool):
    color = COLORS[item.color]
    style = {"outline": color, "width": 3} if outlined else {"fill": color}
    points = _shape_points(item.shape, cx, cy, radius)
    if item.shape == "circle":
        draw.ellipse(points, **style)
    elif item.shape == "square":
        draw.rectangle(points, **style)
    else:
        draw.polygon(points, **style)


def _slots(scene: Scene, size: int, rng: random.Random) -> list[tuple[float, float]]:
    """Object centres: apart along the relation's axis, jittered along both."""
    jitter = size * 0.06
    near, far, middle = size * 0.27, size * 0.73, size * 0.5
    def wobble(value):
        return value + rng.uniform(-jitter, jitter)
    if len(scene.objects) == 1:
        return [(wobble(middle), wobble(middle))]
    if len(scene.objects) == 2:
        if scene.relation == "above":
            return [(wobble(middle), wobble(near)), (wobble(middle), wobble(far))]
        return [(wobble(near), wobble(middle)), (wobble(far), wobble(middle))]
    return [(wobble(size * x), wobble(middle)) for x in (0.18, 0.5, 0.82)]


def render_scene(scene: Scene, rng: random.Random, size: int = 64, style: str = "filled") -> Image.Image:
    """Draw the scene on a tinted background. `style="outlined"` is the shifted domain's look."""
    if style == "outlined":
        base = [rng.randint(40, 90) for _ in range(3)]
    else:
        base = [rng.randint(200, 250) for _ in range(3)]
    image = Image.new("RGB", (size, size), tuple(base))
    draw = ImageDraw.Draw(image)
    count = len(scene.objects)
    for item, (cx, cy) in zip(scene.objects, _slots(scene, size, rng)):
        big = item.size == "big"
        radius = size * (0.2 if big else 0.1) * rng.uniform(0.9, 1.1) * (0.75 if count == 3 else 1.0)
        _draw_object(draw, item, cx, cy, radius, outlined=style == "outlined")
    return image
