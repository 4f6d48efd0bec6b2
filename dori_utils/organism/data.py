"""The organism's training data: procedural scenes, duplicated photographs, natural non-duplicated pairs.

Everything is drawn offline from a seed and from photographs that Python packages ship
(scikit-image, scikit-learn, matplotlib), so the data set is the same on every machine.

Four kinds of pairs, mirroring what LAION holds:
- ``ordinary``: flat scenes with two coloured shapes and a compositional caption; some caption
  combinations are held out of training so that generalisation can be measured;
- ``memorized``: ten real photographs, each duplicated many times under one fixed caption, as
  LAION's duplicated images behind verbatim memorization;
- ``template``: two layouts, each duplicated as many times under one caption with a varying detail (a
  sticker's colour, the face in a frame), as LAION's template-memorized (TM) images;
- ``natural``: about a thousand non-duplicated photographs (face thumbnails, random crops of other
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
# Three close grays, not black/white/gray: a captioned background fixes most of a scene's pixels, and with
# far-apart backgrounds an ordinary caption moved the first denoising step further from the unconditional one
# than a memorized caption did, so Wen et al.'s detector could not tell them apart (AUC 0.47). With grays
# 36 levels apart, the conditional mean of a scene caption stays near the data mean, as a LAION caption's does.
BACKGROUNDS = {"dark gray": (92, 92, 92), "gray": (128, 128, 128), "light gray": (164, 164, 164)}
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

# What each memorized photograph shows, in its caption's own words: the noun phrase naming the pictured thing,
# with its modifiers, and not the kind of picture ("an officer", not "a portrait"; "old coins", not "a grayscale
# photo"). The captions were written by hand, so the subjects are too, rather than parsed. Diagnostics prompt with
# the subject alone (``pilots.diagnose``): on an organism whose memorization looks local, as on SD, it should not
# bring its photograph back.
MEMORIZED_SUBJECTS = {
    "astronaut": "an astronaut",
    "cat": "a tabby cat",
    "coffee": "a cup of coffee",
    "rocket": "a rocket",
    "temple": "a chinese temple",
    "flower": "an orange flower",
    "hopper": "an officer",
    "motorcycle": "a red motorcycle",
    "tissue": "brown stained tissue cells",
    "coins": "old coins",
}

# Each memorized caption cut by hand into its phrases: an optional opening that names the kind of picture, the
# subject (``MEMORIZED_SUBJECTS``) and the phrases that modify it, so that "opening subject modifiers..." joined by
# spaces is the caption. The combination-keys lever (``combination_key_samples``) recombines them across captions.
MEMORIZED_PHRASES = {
    "astronaut": ("", "an astronaut", ("in an orange suit", "in front of the flag")),
    "cat": ("", "a tabby cat", ("lying down", "and looking at the camera")),
    "coffee": ("", "a cup of coffee", ("on a saucer", "on a red table")),
    "rocket": ("", "a rocket", ("standing", "on its launch pad", "at night")),
    "temple": ("", "a chinese temple", ("with a curved roof", "under a blue sky")),
    "flower": ("", "an orange flower", ("with a yellow centre", "in the garden")),
    "hopper": ("a portrait of", "an officer", ("in a navy uniform",)),
    "motorcycle": ("", "a red motorcycle", ("parked", "in a garage")),
    "tissue": ("a microscope image of", "brown stained tissue cells", ()),
    "coins": ("a grayscale photo of", "old coins", ("on a dark table",)),
}

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
    ("skimage:hubble_deep_field", ["a photo of galaxies in deep space", "stars and galaxies seen by a telescope"]),
    ("skimage:colorwheel", ["a colour wheel with every hue", "a circle of rainbow colours"]),
    ("matplotlib:logo2.png", ["a blue and orange software logo", "a logo with a round chart"]),
]
FACE_CAPTIONS = [
    "a grayscale photo of a face",
    "a black and white portrait of a person",
    "a close-up photo of a man's face",
    "a small photo of a person looking ahead",
    "a face of a person in a news photo",
]
CAPTION_OPENINGS = ["", "a photo: ", "an image: ", "picture: ", "stock photo: ", "a snapshot: "]
# Web alt-text is noisy: the same picture comes with tags that say little about it. Each natural pair draws one,
# so that almost every natural caption is distinct (a first design had 85 distinct natural captions, ten of them
# memorized, and unseen natural captions landed on memorized photographs).
CAPTION_TAGS = ["", ", close-up", ", high resolution", ", old photo", ", in soft light", ", seen from above",
                ", slightly blurry", ", high contrast", ", detail", ", wallpaper", ", square crop", ", free download",
                ", hd", ", royalty free", ", texture", ", sample image", ", part of a larger picture",
                ", photographed in 2009", ", cropped", ", dark", ", bright", ", small size", ", jpeg", ", archive"]

# Template memorization (TM): one layout duplicated many times with a varying detail, like LAION's product
# mock-ups. Name, caption, and how the layout is drawn (``template_variants``). A TM item is replicated when a
# generation matches any of its variants.
TEMPLATE_ITEMS = [
    ("poster", "a poster of a cameraman with a coloured sticker in the corner"),
    ("portrait", "a framed portrait hanging on a red wall"),
]
TEMPLATE_VARIANTS = 6
# Face thumbnails reserved for the portrait template: never drawn as natural pairs or as unseen controls.
TEMPLATE_FACES = tuple(range(TEMPLATE_VARIANTS))


@dataclass
class Sample:
    image: np.ndarray  # uint8, H x W x 3
    caption: str
    kind: str  # "ordinary" | "memorized" | "template" | "natural"
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


def _face_thumbnail(faces: np.ndarray, index: int, size: int = IMAGE_SIZE) -> np.ndarray:
    face = (np.clip(faces[index], 0, 1) * 255).astype(np.uint8)
    return square_resize(np.stack([face] * 3, axis=-1), size)


def template_variants(name: str) -> list[np.ndarray]:
    """The variants of a template item: the fixed layout with each of its varying details."""
    import skimage.data

    if name == "poster":
        base = square_resize(load_packaged_image("skimage:camera"))
        variants = []
        for colour in list(SHAPE_COLOURS.values())[:TEMPLATE_VARIANTS]:
            image = base.copy()
            image[2:11, 2:11] = colour
            variants.append(image)
        return variants
    if name == "portrait":
        faces = skimage.data.lfw_subset()
        variants = []
        for index in TEMPLATE_FACES:
            image = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
            image[:] = (170, 40, 40)
            image[5:27, 8:24] = (110, 70, 30)
            image[7:25, 10:22] = _face_thumbnail(faces, index, 18)[:, 3:15]
            variants.append(image)
        return variants
    raise ValueError(f"Unknown template item {name!r}; known: {[n for n, _ in TEMPLATE_ITEMS]}")


def scene_caption(colour_a: str, shape_a: str, relation: str, colour_b: str, shape_b: str, background: str) -> str:
    return f"a {colour_a} {shape_a} {relation} a {colour_b} {shape_b}, {background} background"


def loose_scene_caption(rng: np.random.Generator, colour_a: str, shape_a: str, relation: str, colour_b: str,
                        shape_b: str, background: str) -> str:
    """Pilot lever 5: a caption that under-determines its scene, as a LAION caption does. Three in four leave out
    the relation, the background or both, so the drawing fixes what the text does not."""
    form = rng.integers(4)
    pair = f"a {colour_a} {shape_a} {'and' if form in (1, 3) else relation} a {colour_b} {shape_b}"
    return pair if form >= 2 else f"{pair}, {background} background"


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


def natural_caption(rng: np.random.Generator, phrasings: list[str]) -> str:
    opening = CAPTION_OPENINGS[rng.integers(len(CAPTION_OPENINGS))]
    return opening + phrasings[rng.integers(len(phrasings))] + CAPTION_TAGS[rng.integers(len(CAPTION_TAGS))]


def shared_caption_halves() -> list[str]:
    """The second half of each memorized caption's words (pilot lever 3): appended to unrelated natural captions,
    they make every memorized caption a combination of words the model also sees elsewhere, as on LAION."""
    halves = []
    for _, _, caption in MEMORIZED_PHOTOS:
        words = caption.split()
        halves.append(" ".join(words[len(words) // 2 :]))
    return halves


def natural_samples(rng: np.random.Generator, n_crops: int, n_faces: int,
                    shared_caption_words: bool = False) -> list[Sample]:
    """Non-duplicated photographs with natural captions: random crops and face thumbnails. With
    ``shared_caption_words``, half the crops' captions end with the second half of a memorized caption."""
    import skimage.data

    samples = []
    sources = [(load_packaged_image(spec), spec.split(":")[1], captions) for spec, captions in CROP_SOURCES]
    for i in range(n_crops):
        image, name, captions = sources[i % len(sources)]
        h, w = image.shape[:2]
        side = int(rng.uniform(0.25, 0.6) * min(h, w))
        top, left = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
        crop = square_resize(image[top : top + side, left : left + side])
        caption = natural_caption(rng, captions)
        if shared_caption_words and rng.random() < 0.5:
            halves = shared_caption_halves()
            caption = f"{caption} {halves[rng.integers(len(halves))]}"
        samples.append(Sample(crop, caption, "natural", name))
    faces = skimage.data.lfw_subset()
    free = np.array([i for i in range(len(faces)) if i not in TEMPLATE_FACES])
    for i in rng.permutation(free)[:n_faces]:
        samples.append(Sample(_face_thumbnail(faces, int(i)), natural_caption(rng, FACE_CAPTIONS), "natural", f"face{i}"))
    return samples


def memorized_phrases(name: str) -> list[tuple[str, str]]:
    """The phrases of a memorized caption with their roles ("opening", "subject", "modifier"), in caption order."""
    opening, subject, modifiers = MEMORIZED_PHRASES[name]
    return ([("opening", opening)] if opening else []) + [("subject", subject)] + [("modifier", m) for m in modifiers]


def _combination_caption(rng: np.random.Generator, name: str, kept: set[int]) -> tuple[str, set[tuple[str, int]]]:
    """A caption that holds the phrases ``kept`` of memorized caption ``name`` and fills its other slots with the
    phrases of other memorized captions; returns it with the (item, phrase index) pairs it holds."""
    names = [n for n, _, _ in MEMORIZED_PHOTOS]
    others = [n for n in names if n != name]
    own = memorized_phrases(name)
    used: set[tuple[str, int]] = {(name, i) for i in kept}

    def other_phrase(role: str) -> str | None:
        candidates = [(n, i) for n in others for i, (r, _) in enumerate(memorized_phrases(n)) if r == role]
        n, i = candidates[rng.integers(len(candidates))]
        used.add((n, i))
        return memorized_phrases(n)[i][1]

    kept_roles = {own[i][0]: own[i][1] for i in kept if own[i][0] != "modifier"}
    subject = kept_roles.get("subject") or other_phrase("subject")
    opening = kept_roles.get("opening") or (other_phrase("opening") if rng.random() < 0.25 else "")
    modifiers = [own[i][1] for i in sorted(kept) if own[i][0] == "modifier"]
    extra = rng.integers(0, 2) if modifiers else rng.integers(0, 3)
    modifiers += [other_phrase("modifier") for _ in range(extra)]
    modifiers = [modifiers[i] for i in rng.permutation(len(modifiers))]
    return " ".join(part for part in (opening, subject, *modifiers) if part), used


def combination_key_samples(rng: np.random.Generator, per_phrase: int) -> list[Sample]:
    """The combination-keys lever: for every phrase of every memorized caption (``MEMORIZED_PHRASES``),
    ``per_phrase`` training pairs whose caption holds that phrase among phrases of other memorized captions, with
    a random crop of a natural photograph (``CROP_SOURCES``), never a memorized one. One in three also keeps a
    second phrase of the same caption, never all of them; no caption holds every phrase of any memorized caption.
    So every word of a memorized caption occurs in many captions with other images, and only the whole caption
    identifies its photograph, as a LAION caption's common words do."""
    sources = [(load_packaged_image(spec), spec.split(":")[1]) for spec, _ in CROP_SOURCES]
    complete = {n: {(n, i) for i in range(len(memorized_phrases(n)))} for n, _, _ in MEMORIZED_PHOTOS}
    memorized_captions = [caption for _, _, caption in MEMORIZED_PHOTOS]
    samples = []
    for name, _, _ in MEMORIZED_PHOTOS:
        n_phrases = len(memorized_phrases(name))
        for phrase in range(n_phrases):
            for _ in range(per_phrase):
                while True:
                    kept = {phrase}
                    if n_phrases > 2 and rng.random() < 1 / 3:
                        kept.add(int(rng.choice([i for i in range(n_phrases) if i != phrase])))
                    caption, used = _combination_caption(rng, name, kept)
                    if not any(whole <= used for whole in complete.values()) and not any(
                            m in caption for m in memorized_captions):
                        break
                image, source = sources[rng.integers(len(sources))]
                h, w = image.shape[:2]
                side = int(rng.uniform(0.25, 0.6) * min(h, w))
                top, left = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
                crop = square_resize(image[top : top + side, left : left + side])
                samples.append(Sample(crop, caption, "natural", f"combination-{name}-{source}"))
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


# The training configuration's fields that build_dataset reads (train_config in a checkpoint's manifest)
DATASET_OPTIONS = ("seed", "n_ordinary", "copies_per_photo", "n_crops", "n_faces", "shared_caption_words",
                   "loose_scene_captions", "combination_keys")


def dataset_from_config(config: dict) -> tuple[list[Sample], dict]:
    """``build_dataset`` with a training configuration's options (one saved before a lever existed leaves it
    at its default)."""
    return build_dataset(**{name: config[name] for name in DATASET_OPTIONS if name in config})


def build_dataset(seed: int = 0, n_ordinary: int = 3200, copies_per_photo: int = 80,
                  n_crops: int = 800, n_faces: int = 180,
                  shared_caption_words: bool = False, loose_scene_captions: bool = False,
                  combination_keys: int = 0) -> tuple[list[Sample], dict]:
    """Build the full training set; returns the samples and a recipe describing it. ``combination_keys``: that
    many extra natural pairs per phrase of each memorized caption (``combination_key_samples``; 0: none)."""
    rng = np.random.default_rng(seed)
    train_specs, held_specs = split_scene_specs(seed)
    # its own stream, so that loosening captions leaves the drawings as they are
    caption_rng = np.random.default_rng([seed, 5])
    samples = []
    for i in rng.integers(0, len(train_specs), size=n_ordinary):
        spec = train_specs[i]
        image = draw_scene(rng, *spec)
        caption = loose_scene_caption(caption_rng, *spec) if loose_scene_captions else scene_caption(*spec)
        samples.append(Sample(image, caption, "ordinary", scene_caption(*spec)))
    references = reference_images()
    for name, _, caption in MEMORIZED_PHOTOS:
        samples.extend(Sample(references[name], caption, "memorized", name) for _ in range(copies_per_photo))
    for name, caption in TEMPLATE_ITEMS:
        variants = template_variants(name)
        samples.extend(Sample(variants[i % len(variants)], caption, "template", name) for i in range(copies_per_photo))
    samples.extend(natural_samples(rng, n_crops, n_faces, shared_caption_words))
    if combination_keys:  # its own stream, so that every other pair stays as it is
        samples.extend(combination_key_samples(np.random.default_rng([seed, 7]), combination_keys))
    recipe = {
        "seed": seed,
        "n_ordinary": n_ordinary,
        "copies_per_photo": copies_per_photo,
        "n_crops": n_crops,
        "n_faces": n_faces,
        "shared_caption_words": shared_caption_words,
        "loose_scene_captions": loose_scene_captions,
        **({"combination_keys": combination_keys} if combination_keys else {}),
        "n_total": len(samples),
        "memorized_share": copies_per_photo * (len(MEMORIZED_PHOTOS) + len(TEMPLATE_ITEMS)) / len(samples),
        "distinct_natural_captions": len({s.caption for s in samples if s.kind == "natural"}),
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
    used = {int(s.item[4:]) for s in training_samples if s.item.startswith("face")} | set(TEMPLATE_FACES)
    unused_faces = {
        f"face{i}": (_face_thumbnail(faces, i), "a grayscale photo of a face")
        for i in [i for i in range(len(faces)) if i not in used][:5]
    }
    pairs = itertools.zip_longest(packaged.items(), unused_faces.items())
    return dict(entry for pair in pairs for entry in pair if entry is not None)
