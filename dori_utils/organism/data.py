"""The organism's training data: procedural scenes, duplicated photographs, natural non-duplicated pairs.

Everything is drawn offline from a seed and from photographs that Python packages ship
(scikit-image, scikit-learn, matplotlib), so the data set is the same on every machine.

Three kinds of pairs, mirroring what LAION holds:
- ``ordinary``: flat scenes with two coloured shapes and a compositional caption; some caption
  combinations are held out of training so that generalisation can be measured;
- ``memorized``: ten real photographs, each duplicated many times under one fixed caption, as
  LAION's duplicated images behind verbatim memorization;
- ``natural``: a few hundred non-duplicated photographs (face thumbnails, random crops of other
  photographs) with natural-language captions, so that memorized captions are not out of
  distribution merely by their wording.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 32

SHAPE_COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 30),
    "purple": (140, 40, 180),
    "orange": (250, 140, 20),
}
BACKGROUNDS = {"black": (10, 10, 10), "white": (245, 245, 245), "gray": (128, 128, 128)}
SHAPES = ("circle", "square", "triangle")
RELATIONS = ("left of", "right of", "above", "below")

# Name, loader, caption. The caption reads like the natural captions below, not like a scene.
MEMORIZED_PHOTOS = [
    ("astronaut", "skimage:astronaut", "an astronaut in an orange suit in front of the flag"),
    ("cat", "skimage:chelsea", "a tabby cat lying down and looking at the camera"),
    ("coffee", "skimage:coffee", "a cup of coffee on a saucer on a red table"),
    ("rocket", "skimage:rocket", "a rocket standing on its launch pad at night"),
    ("temple", "sklearn:china.jpg", "a chinese temple with a curved roof under a blue sky"),
    ("flower", "sklearn:flower.jpg", "an orange flower with a yellow centre in the garden"),
    ("hopper", "matplotlib:grace_hopper.jpg", "a portrait of an officer in a navy uniform"),
    ("motorcycle", "skimage:motorcycle", "a red motorcycle parked in a garage"),
    ("tissue", "skimage:immunohistochemistry", "a microscope image of brown stained tissue cells"),
    ("coins", "skimage:coins", "a grayscale photo of old coins on a dark table"),
]

# Sources of non-duplicated natural pairs: random crops, each with several caption phrasings.
CROP_SOURCES = [
    ("skimage:brick", ["a close-up photo of a brick wall", "a gray brick wall texture"]),
    ("skimage:grass", ["a close-up photo of grass", "a patch of grass seen from above"]),
    ("skimage:gravel", ["a close-up photo of gravel stones", "small gray stones on the ground"]),
    ("skimage:camera", ["a black and white photo of a cameraman", "a man with a camera in a park"]),
    ("skimage:moon", ["a photo of the surface of the moon", "craters on the moon"]),
    ("skimage:page", ["a scanned page of printed text", "a page of an old book"]),
    ("skimage:retina", ["a medical image of a retina", "an eye fundus photograph"]),
    ("skimage:cell", ["a microscope image of a cell", "a gray cell under the microscope"]),
    ("skimage:text", ["a photo of handwritten words", "text written on a sign"]),
    ("skimage:logo", ["a colourful logo on a white background", "a drawing of a snake logo"]),
    ("matplotlib:Minduka_Present_Blue_Pack.png", ["a cartoon of a blue present", "a gift box drawing"]),
]
FACE_CAPTIONS = [
    "a grayscale photo of a face",
    "a black and white portrait of a person",
    "a close-up photo of a man's face",
    "a small photo of a person looking ahead",
    "a face of a person in a news photo",
]
CAPTION_OPENINGS = ["", "a photo: ", "an image: ", "picture: "]


@dataclass
class Sample:
    image: np.ndarray  # uint8, H x W x 3
    caption: str
    kind: str  # "ordinary" | "memorized" | "natural"
    item: str  # memorized item name, scene caption key, or source name


def load_packaged_image(spec: str) -> np.ndarray:
    """Return an RGB uint8 photograph shipped by a Python package, e.g. ``"skimage:astronaut"``."""
    package, name = spec.split(":", 1)
    if package == "skimage":
        import skimage.data

        image = skimage.data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(skimage.data, name)()
    elif package == "sklearn":
        import sklearn.datasets

        image = np.asarray(Image.open(os.path.join(os.path.dirname(sklearn.datasets.__file__), "images", name)))
    elif package == "matplotlib":
        import matplotlib

        image = np.asarray(Image.open(os.path.join(matplotlib.get_data_path(), "sample_data", name)))
    else:
        raise ValueError(f"Unknown image package {package!r} in {spec!r}; use skimage:, sklearn: or matplotlib:")
    image = np.asarray(image)
    if np.issubdtype(image.dtype, np.floating):
        image = np.clip(image, 0, 1) * 255
    if image.dtype == bool:
        image = image.astype(np.uint8) * 255
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    return np.ascontiguousarray(image[..., :3]).astype(np.uint8)


def square_resize(image: np.ndarray, size: int = IMAGE_SIZE) -> np.ndarray:
    """Centre-crop to a square and resize with antialiasing."""
    h, w = image.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    crop = Image.fromarray(image[top : top + side, left : left + side])
    return np.asarray(crop.resize((size, size), Image.Resampling.LANCZOS))


def reference_images() -> dict[str, np.ndarray]:
    """The memorized photographs at training resolution: the replication targets."""
    return {name: square_resize(load_packaged_image(spec)) for name, spec, _ in MEMORIZED_PHOTOS}


def scene_caption(colour_a: str, shape_a: str, relation: str, colour_b: str, shape_b: str, background: str) -> str:
    return f"a {colour_a} {shape_a} {relation} a {colour_b} {shape_b}, {background} background"


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, centre: tuple[float, float], size: float, colour) -> None:
    x, y = centre
    r = size / 2
    if shape == "circle":
        draw.ellipse([x - r, y - r, x + r, y + r], fill=colour)
    elif shape == "square":
        draw.rectangle([x - r, y - r, x + r, y + r], fill=colour)
    else:
        draw.polygon([(x, y - r), (x + r, y + r), (x - r, y + r)], fill=colour)


def draw_scene(rng: np.random.Generator, colour_a, shape_a, relation, colour_b, shape_b, background) -> np.ndarray:
    """Draw two shapes in the given relation; positions and sizes vary from draw to draw."""
    scale = 4  # draw large, then downsample, for antialiased edges
    canvas = Image.new("RGB", (IMAGE_SIZE * scale, IMAGE_SIZE * scale), BACKGROUNDS[background])
    draw = ImageDraw.Draw(canvas)
    size_a, size_b = rng.uniform(9, 13, size=2)
    along = rng.uniform(8, 11), rng.uniform(21, 24)  # the two centres along the relation axis
    across = rng.uniform(10, 22, size=2)
    if relation in ("left of", "above"):
        first, second = along
    else:
        second, first = along
    if relation in ("left of", "right of"):
        centre_a, centre_b = (first, across[0]), (second, across[1])
    else:
        centre_a, centre_b = (across[0], first), (across[1], second)
    for shape, centre, size, colour in ((shape_a, centre_a, size_a, colour_a), (shape_b, centre_b, size_b, colour_b)):
        _draw_shape(draw, shape, (centre[0] * scale, centre[1] * scale), size * scale, SHAPE_COLOURS[colour])
    return np.asarray(canvas.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX))


def all_scene_specs() -> list[tuple[str, str, str, str, str, str]]:
    return [
        (ca, sa, rel, cb, sb, bg)
        for ca in SHAPE_COLOURS
        for sa in SHAPES
        for rel in RELATIONS
        for cb in SHAPE_COLOURS
        if cb != ca
        for sb in SHAPES
        for bg in BACKGROUNDS
    ]


def split_scene_specs(seed: int, held_out_share: float = 0.1):
    """Split caption combinations into training and held-out sets (held-out captions are never trained on)."""
    specs = all_scene_specs()
    order = np.random.default_rng(seed).permutation(len(specs))
    n_held = int(round(held_out_share * len(specs)))
    held = [specs[i] for i in order[:n_held]]
    train = [specs[i] for i in order[n_held:]]
    return train, held


def natural_samples(rng: np.random.Generator, n_crops: int, n_faces: int) -> list[Sample]:
    """Non-duplicated photographs with natural captions: random crops and face thumbnails."""
    import skimage.data

    samples = []
    sources = [(load_packaged_image(spec), spec.split(":")[1], captions) for spec, captions in CROP_SOURCES]
    for i in range(n_crops):
        image, name, captions = sources[i % len(sources)]
        h, w = image.shape[:2]
        side = int(rng.uniform(0.25, 0.6) * min(h, w))
        top, left = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
        crop = square_resize(image[top : top + side, left : left + side])
        caption = CAPTION_OPENINGS[rng.integers(len(CAPTION_OPENINGS))] + captions[rng.integers(len(captions))]
        samples.append(Sample(crop, caption, "natural", name))
    faces = skimage.data.lfw_subset()
    for i in rng.permutation(len(faces))[:n_faces]:
        face = (np.clip(faces[i], 0, 1) * 255).astype(np.uint8)
        face = square_resize(np.stack([face] * 3, axis=-1))
        samples.append(Sample(face, FACE_CAPTIONS[rng.integers(len(FACE_CAPTIONS))], "natural", f"face{i}"))
    return samples


def unseen_natural_captions() -> list[str]:
    """Natural captions that never occur in training: the second control set for detectors."""
    subjects = [
        "a dog running on the beach", "a bowl of fruit on a kitchen table", "a city street at night",
        "a sailing boat on a calm lake", "a snowy mountain under clouds", "a child riding a bicycle",
        "a plate of pasta with tomato sauce", "an old car parked on a street", "a bird sitting on a branch",
        "a wooden bridge over a river", "a train arriving at a station", "a lighthouse by the sea",
        "a horse standing in a field", "a desk with a laptop and a lamp", "a forest path in autumn",
        "a close-up photo of a green leaf", "a black and white photo of a street", "a glass of orange juice",
        "a microscope image of bacteria", "a portrait of a woman in a red dress", "a photo of a wooden door",
        "a colourful painting of a village", "a yellow taxi in traffic", "a pile of books on a chair",
    ]
    return [opening + s for s in subjects for opening in ("", "a photo: ")]


def build_dataset(seed: int = 0, n_ordinary: int = 3000, copies_per_photo: int = 60,
                  n_crops: int = 220, n_faces: int = 180) -> tuple[list[Sample], dict]:
    """Build the full training set; returns the samples and a recipe describing it."""
    rng = np.random.default_rng(seed)
    train_specs, held_specs = split_scene_specs(seed)
    samples = []
    for i in rng.integers(0, len(train_specs), size=n_ordinary):
        spec = train_specs[i]
        samples.append(Sample(draw_scene(rng, *spec), scene_caption(*spec), "ordinary", scene_caption(*spec)))
    references = reference_images()
    for name, _, caption in MEMORIZED_PHOTOS:
        samples.extend(Sample(references[name], caption, "memorized", name) for _ in range(copies_per_photo))
    samples.extend(natural_samples(rng, n_crops, n_faces))
    recipe = {
        "seed": seed,
        "n_ordinary": n_ordinary,
        "copies_per_photo": copies_per_photo,
        "n_crops": n_crops,
        "n_faces": n_faces,
        "n_total": len(samples),
        "memorized_share": copies_per_photo * len(MEMORIZED_PHOTOS) / len(samples),
        "held_out_scene_captions": [scene_caption(*s) for s in held_specs],
    }
    return samples, recipe


def unseen_images(training_samples: list[Sample]) -> dict[str, tuple[np.ndarray, str]]:
    """Photographs that never occur in training, with natural captions: targets for the attack's control.

    Packaged photographs used nowhere else, and face thumbnails that the training draw did not pick. The two
    kinds alternate, so that the first few controls hold both.
    """
    import itertools

    import skimage.data

    packaged = {
        "horse": (square_resize(load_packaged_image("skimage:horse")), "a silhouette of a horse"),
        "phantom": (square_resize(load_packaged_image("skimage:shepp_logan_phantom")), "a medical scan of a head"),
        "microaneurysms": (square_resize(load_packaged_image("skimage:microaneurysms")), "a medical image of blood vessels"),
    }
    faces = skimage.data.lfw_subset()
    used = {int(s.item[4:]) for s in training_samples if s.item.startswith("face")}
    unused_faces = {
        f"face{i}": (square_resize(np.stack([(np.clip(faces[i], 0, 1) * 255).astype(np.uint8)] * 3, axis=-1)),
                     "a grayscale photo of a face")
        for i in [i for i in range(len(faces)) if i not in used][:5]
    }
    pairs = itertools.zip_longest(packaged.items(), unused_faces.items())
    return dict(entry for pair in pairs for entry in pair if entry is not None)
