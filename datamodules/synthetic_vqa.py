"""Synthetic VQA benchmark: seeded scenes of coloured shapes on a grid, questions with a closed answer set.

Plain Python + PIL + numpy (no torch, no Lightning). Every object fills one cell of an 8x8 grid and one
cell is exactly one ViT patch of the default tiny model, so an answer usually depends on one or two
visual tokens: pruning visual tokens really removes the evidence. Scenes hold 8-12 objects by default,
more than the 7 of 64 tokens a layer-averaged r = 0.889 keeps, so a selection that ignores the question must drop
objects a question may need (with 4-7 objects, keeping the salient tokens kept every object; docs/findings.md).

Splits are disjoint by construction: a scene belongs to the split chosen by a hash of its content, so
the same scene can never appear in two splits, whatever the seeds.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field

from PIL import Image, ImageDraw

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 90, 240),
    "yellow": (240, 220, 40),
    "purple": (160, 60, 210),
    "cyan": (40, 220, 220),
    "orange": (250, 140, 20),
    "white": (245, 245, 245),
}
SHAPES = ("square", "circle", "triangle", "cross")
SIZES = ("small", "large")
# the neighbouring cell: "directly", since "left of the red square" alone also fits objects further along the row
DIRECTIONS = {"directly left of": (0, -1), "directly right of": (0, 1), "directly above": (-1, 0),
              "directly below": (1, 0)}
NUMBER_WORDS = ("zero", "one", "two", "three", "four")
YES_NO = ("yes", "no")
FAMILIES = ("query_at", "query_ref", "relate", "exist", "count", "compare")
SPLITS = ("train", "val", "test")
MAX_FAILED_DRAWS = 20_000
_SPLIT_BUCKETS = {"train": range(0, 8), "val": range(8, 9), "test": range(9, 10)}
ANSWER_VOCABULARY = tuple(COLORS) + SHAPES + SIZES + YES_NO + NUMBER_WORDS
DESCRIBE_PREFIX = "describe the objects that matter for :"
DESCRIBE_SCENE = "describe the image ."
CONTEXT_PREFIX = "additional information :"


@dataclass(frozen=True)
class SceneObject:
    color: str
    shape: str
    size: str
    row: int
    col: int

    def phrase(self) -> str:
        """Compact description, 1-based grid coordinates: 'red large square at 2 3'."""
        return f"{self.color} {self.size} {self.shape} at {self.row + 1} {self.col + 1}"


@dataclass
class Scene:
    objects: list[SceneObject]
    distractors: list[tuple[int, int]]
    grid: int
    seed: int

    def key(self) -> str:
        return ";".join(o.phrase() for o in sorted(self.objects, key=lambda o: (o.row, o.col)))

    def at(self, row: int, col: int) -> SceneObject | None:
        for obj in self.objects:
            if obj.row == row and obj.col == col:
                return obj
        return None

    def description(self, objects: list[SceneObject] | None = None) -> str:
        chosen = self.objects if objects is None else objects
        if not chosen:
            return "nothing"
        return " ; ".join(o.phrase() for o in sorted(chosen, key=lambda o: (o.row, o.col)))


@dataclass
class VQASample:
    """One question about one image.

    `relevant` lists the objects the answer depends on; `description()` of them is the text a caption
    must carry when the image is gone.
    """

    question_id: str
    scene: Scene
    question: str
    answer: str
    family: str
    relevant: list[SceneObject] = field(default_factory=list)

    @property
    def relevant_description(self) -> str:
        return self.scene.description(self.relevant)


def split_of(scene: Scene) -> str:
    bucket = int(hashlib.sha1(scene.key().encode()).hexdigest(), 16) % 10
    return next(s for s, r in _SPLIT_BUCKETS.items() if bucket in r)


def sample_scene(rng: random.Random, grid: int, min_objects: int, max_objects: int, seed: int) -> Scene:
    cells = rng.sample([(r, c) for r in range(grid) for c in range(grid)], max_objects + 4)
    n = rng.randint(min_objects, max_objects)
    objects = [
        SceneObject(rng.choice(list(COLORS)), rng.choice(SHAPES), rng.choice(SIZES), r, c)
        for r, c in cells[:n]
    ]
    return Scene(objects=objects, distractors=cells[n : n + rng.randint(0, 4)], grid=grid, seed=seed)


def render(scene: Scene, cell_size: int = 8, background: tuple[int, int, int] = (20, 20, 24)) -> Image.Image:
    size = scene.grid * cell_size
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    for r, c in scene.distractors:
        # grey specks: clutter that is never an object, so the model must tell objects from noise
        x, y = c * cell_size + cell_size // 2, r * cell_size + cell_size // 2
        draw.rectangle([x - 1, y - 1, x, y], fill=(110, 110, 110))
    for obj in scene.objects:
        _draw_object(draw, obj, cell_size)
    return image


def _draw_object(draw: ImageDraw.ImageDraw, obj: SceneObject, cell: int) -> None:
    margin = 0 if obj.size == "large" else max(1, cell // 8)
    x0, y0 = obj.col * cell + margin, obj.row * cell + margin
    x1, y1 = (obj.col + 1) * cell - 1 - margin, (obj.row + 1) * cell - 1 - margin
    fill = COLORS[obj.color]
    if obj.shape == "square":
        draw.rectangle([x0, y0, x1, y1], fill=fill)
    elif obj.shape == "circle":
        draw.ellipse([x0, y0, x1, y1], fill=fill)
    elif obj.shape == "triangle":
        draw.polygon([((x0 + x1) / 2, y0), (x0, y1), (x1, y1)], fill=fill)
    else:
        mid_x, mid_y, w = (x0 + x1) // 2, (y0 + y1) // 2, max(1, (x1 - x0) // 4)
        draw.rectangle([x0, mid_y - w, x1, mid_y + w], fill=fill)
        draw.rectangle([mid_x - w, y0, mid_x + w, y1], fill=fill)


def _unique(scene: Scene, obj: SceneObject, attrs: tuple[str, ...]) -> bool:
    return sum(all(getattr(o, a) == getattr(obj, a) for a in attrs) for o in scene.objects) == 1


def _ref(obj: SceneObject, attrs: tuple[str, ...]) -> str:
    words = [getattr(obj, a) for a in ("color", "size", "shape") if a in attrs]
    return " ".join(words) + ("" if "shape" in attrs else " object")


def make_question(scene: Scene, family: str, rng: random.Random) -> tuple[str, str, list[SceneObject]] | None:
    """A (question, answer, relevant objects) triple of the family, or None when the scene has none."""
    objs = scene.objects
    if family == "query_at":
        obj = rng.choice(objs)
        attr = rng.choice(("color", "shape", "size"))
        return f"what is the {attr} of the object at row {obj.row + 1} column {obj.col + 1} ?", getattr(obj, attr), [obj]
    if family == "query_ref":
        obj = rng.choice(objs)
        for ref_attrs in (("color",), ("shape",), ("color", "shape")):
            if _unique(scene, obj, ref_attrs):
                asked = rng.choice([a for a in ("color", "shape", "size") if a not in ref_attrs])
                return f"what is the {asked} of the {_ref(obj, ref_attrs)} ?", getattr(obj, asked), [obj]
        return None
    if family == "relate":
        pairs = []
        for ref in objs:
            if not _unique(scene, ref, ("color", "shape")):
                continue
            for name, (dr, dc) in DIRECTIONS.items():
                target = scene.at(ref.row + dr, ref.col + dc)
                if target is not None:
                    pairs.append((ref, name, target))
        if not pairs:
            return None
        ref, name, target = rng.choice(pairs)
        asked = rng.choice(("color", "shape"))
        return (
            f"what is the {asked} of the object {name} the {_ref(ref, ('color', 'shape'))} ?",
            getattr(target, asked),
            [ref, target],
        )
    if family == "exist":
        color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
        # half the draws ask about an object of the scene: 'no' would otherwise dominate; the other half still hit
        # one about a quarter of the time, so about 60 % of the answers are 'yes' (60.8 % on the test split)
        if rng.random() < 0.5:
            obj = rng.choice(objs)
            color, shape = obj.color, obj.shape
        matches = [o for o in objs if o.color == color and o.shape == shape]
        return f"is there a {color} {shape} ?", "yes" if matches else "no", matches
    if family == "count":
        if rng.random() < 0.5:
            color = rng.choice([o.color for o in objs])
        else:
            color = rng.choice(list(COLORS))
        matches = [o for o in objs if o.color == color]
        if len(matches) >= len(NUMBER_WORDS):
            return None
        return f"how many {color} objects are there ?", NUMBER_WORDS[len(matches)], matches
    if family == "compare":
        uniques = [o for o in objs if _unique(scene, o, ("color",))]
        if len(uniques) < 2:
            return None
        a, b = rng.sample(uniques, 2)
        attr = rng.choice(("shape", "size"))
        same = getattr(a, attr) == getattr(b, attr)
        return f"do the {a.color} object and the {b.color} object have the same {attr} ?", "yes" if same else "no", [a, b]
    raise ValueError(f"unknown question family {family!r}; known: {FAMILIES}")


@dataclass
class SyntheticVQAConfig:
    """Size and difficulty of the synthetic benchmark.

    Args:
        grid: cells per image side (one object per cell).
        cell_size: pixels per cell; grid * cell_size is the image size.
        min_objects: fewest objects per scene.
        max_objects: most objects per scene.
        families: question families to draw from (uniformly).
        seed: base seed; (seed, split, index) fixes every sample.
        train_min_objects: fewest objects of a training scene. Scenes with one or two objects make the first
            steps of training from scratch find the image at all (a curriculum through the data mix);
            validation and test scenes always have min_objects..max_objects.
    """

    grid: int = 8
    cell_size: int = 8
    min_objects: int = 8
    max_objects: int = 12
    families: tuple[str, ...] = FAMILIES
    seed: int = 0
    train_min_objects: int | None = None

    def __post_init__(self) -> None:
        unknown = [f for f in self.families if f not in FAMILIES]
        if not self.families:
            raise ValueError(f"families is empty: choose at least one of {list(FAMILIES)}")
        if unknown:
            raise ValueError(f"unknown question families {unknown}; known: {list(FAMILIES)}")
        if not 1 <= self.min_objects <= self.max_objects:
            raise ValueError(f"min_objects={self.min_objects}, max_objects={self.max_objects}: need "
                             "1 <= min_objects <= max_objects")
        if self.max_objects + 4 > self.grid**2:
            raise ValueError(f"max_objects={self.max_objects} objects and up to 4 distractors do not fit a "
                             f"{self.grid}x{self.grid} grid")
        _check_cell_size(self.cell_size)
        if self.train_min_objects is not None and not 1 <= self.train_min_objects <= self.max_objects:
            raise ValueError(f"train_min_objects={self.train_min_objects} must be in [1, max_objects={self.max_objects}]")

    @property
    def image_size(self) -> int:
        return self.grid * self.cell_size


def _check_cell_size(cell_size: int) -> None:
    """Every shape and size must render differently in one cell, or some answers could not be read from pixels
    (at 7 pixels a small circle and a small cross are the same pixels; 6 and 8 upwards are distinct)."""
    if cell_size < 3:
        raise ValueError(f"cell_size={cell_size} pixels is too small to draw the shapes; use 6 or at least 8")
    renders: dict[bytes, tuple[str, str]] = {}
    for shape in SHAPES:
        for size in SIZES:
            image = Image.new("RGB", (cell_size, cell_size))
            _draw_object(ImageDraw.Draw(image), SceneObject("white", shape, size, 0, 0), cell_size)
            same = renders.setdefault(image.tobytes(), (shape, size))
            if same != (shape, size):
                raise ValueError(f"cell_size={cell_size} pixels draws a {same[1]} {same[0]} and a {size} {shape} "
                                 "alike, so questions about them cannot be answered from the image; use 6 or at "
                                 "least 8")


def generate_samples(config: SyntheticVQAConfig, split: str, num_samples: int) -> list[VQASample]:
    """Deterministic list of samples of one split (same config, split, count -> same samples)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known: {SPLITS}")
    rng = random.Random(f"{config.seed}/{split}")
    fewest = config.train_min_objects if split == "train" and config.train_min_objects else config.min_objects
    samples: list[VQASample] = []
    failed_draws = 0  # since the last sample: a family no scene of these sizes can ask would otherwise loop forever
    while len(samples) < num_samples:
        if failed_draws == MAX_FAILED_DRAWS:
            family = config.families[len(samples) % len(config.families)]
            raise ValueError(f"no {split} sample of family {family!r} in {MAX_FAILED_DRAWS} scene draws (of any "
                             f"split) of {fewest}-{config.max_objects} objects on a {config.grid}x{config.grid} grid: "
                             "the family needs other scene sizes (compare: two objects of distinct colours; relate: "
                             "two neighbours), or leave it out of families")
        failed_draws += 1
        scene_seed = rng.getrandbits(32)
        scene_rng = random.Random(scene_seed)
        scene = sample_scene(scene_rng, config.grid, fewest, config.max_objects, scene_seed)
        if split_of(scene) != split:
            continue
        family = config.families[len(samples) % len(config.families)]
        made = make_question(scene, family, scene_rng)
        if made is None:
            continue
        question, answer, relevant = made
        samples.append(VQASample(f"{split}-{len(samples):06d}", scene, question, answer, family, relevant))
        failed_draws = 0
    return samples


def vocabulary(config: SyntheticVQAConfig) -> list[str]:
    """Every word the generator, the descriptions and the prompt template can produce."""
    words = set(ANSWER_VOCABULARY)
    words.update(str(i) for i in range(1, config.grid + 1))
    for text in (
        "what is the color shape size of object at row column ? left right above below is there a how many "
        "objects are do and have same",
        DESCRIBE_PREFIX,
        DESCRIBE_SCENE,
        CONTEXT_PREFIX,
        "; , . nothing",
    ):
        words.update(text.split())
    for direction in DIRECTIONS:
        words.update(direction.split())
    return sorted(words)
