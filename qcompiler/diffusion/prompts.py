"""Prompts for a pipeline's calibration and evaluation: a text file (one per line) or N built-in ones.

``--prompts`` takes either a number N (the first N of the pipeline's own prompt list,
``PIPELINE_PROMPTS`` in its folder, when it ships one, else of ``GENERIC_PROMPTS``; cycled when
N is larger, so two runs with the same N use the same prompts) or a UTF-8 text file with one
prompt per line (blank lines skipped). A pipeline whose text encoder knows a small vocabulary
(the zoo's MNIST captions) ships its prompts that way. The built-in list is deliberately generic (objects, scenes,
styles): calibration needs the activations a text encoder produces for ordinary captions, not
any one subject. Both are checked before any model is loaded: a file that is empty, binary or
not UTF-8 is a ``QCompileError`` naming it.
"""

from __future__ import annotations

from pathlib import Path

from qcompiler.errors import QCompileError

#: A pipeline folder's own prompt list (one per line), the source of ``--prompts N`` when present.
PIPELINE_PROMPTS = "prompts.txt"

GENERIC_PROMPTS = (
    "a photograph of a red apple on a wooden table",
    "a mountain lake at sunrise, mist over the water",
    "a portrait of an old man with a grey beard",
    "a city street at night with neon signs and rain",
    "a cat sleeping on a windowsill in the sun",
    "an oil painting of a sailing ship in a storm",
    "a bowl of ramen with an egg and green onions",
    "a modern living room with large windows",
    "a watercolor of a fox in a snowy forest",
    "a vintage car parked in front of a diner",
    "a close-up of a sunflower with a bee",
    "an astronaut walking on a rocky desert planet",
    "a lighthouse on a cliff above crashing waves",
    "a pencil sketch of a horse galloping",
    "a plate of pancakes with berries and syrup",
    "a busy market with colorful fruit stalls",
)


def parse_prompts(value: str) -> int | Path:
    """``--prompts`` as given: a positive count, or the path of a prompt file."""
    text = str(value).strip()
    if text.isdigit():
        count = int(text)
        if count < 1:
            raise QCompileError("--prompts must be a positive number or a text file of prompts")
        return count
    return Path(text)


def read_prompt_file(path: str | Path) -> list[str]:
    """Non-blank lines of a UTF-8 text file, stripped; QCompileError naming the file otherwise."""
    path = Path(path)
    if not path.is_file():
        raise QCompileError(f"{path}: prompt file not found (--prompts takes a number or a text file)")
    data = path.read_bytes()
    try:
        if b"\0" in data:
            raise UnicodeDecodeError("utf-8", data, 0, 1, "NUL byte")
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise QCompileError(f"{path}: not a text file of prompts (expected UTF-8 text, one prompt per line)") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise QCompileError(f"{path}: no prompts (the file is empty; write one prompt per line)")
    return prompts


def prompts_from(value: int | str | Path, pipeline_root: str | Path | None = None) -> list[str]:
    """The prompt list for ``--prompts``: the lines of a file, or N prompts (the pipeline's own list when
    ``pipeline_root/prompts.txt`` exists, else the built-in one)."""
    spec = parse_prompts(value) if isinstance(value, str) else value
    if not isinstance(spec, int):
        return read_prompt_file(spec)
    own = None if pipeline_root is None else Path(pipeline_root) / PIPELINE_PROMPTS
    source = read_prompt_file(own) if own is not None and own.is_file() else GENERIC_PROMPTS
    return [source[i % len(source)] for i in range(spec)]
