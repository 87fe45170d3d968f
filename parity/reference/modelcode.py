"""What the model's own code needs while parity loads and runs it, and what parity says when it fails.

A real XComposer2 folder's code downloads its CLIP ViT by hub id inside `__init__`
(`CLIPVisionModel.from_pretrained("openai/clip-vit-large-patch14-336")`). parity never downloads: the hub
model must be in the offline Hugging Face cache (HF_HOME) or be given as a local folder (`provide`, the CLI's
`--hub-model ID=PATH`). A missing one is `MissingHubModel` (bad input, exit 2), naming the hub id, the model
file and function that asked for it, and both ways to provide it.

`apply_clip_geometry` is the one in-process fix parity makes to a loaded model, and only where lmdeploy's
vision loader makes it too (lmdeploy/vl/model/xcomposer2.py sets the CLIP embeddings' `image_size` to
`img_size` after `resize_pos()`); the model folder is never changed and each fix is reported ("applied: ...").

`model_code_error` turns an exception raised inside the model's own code into one paragraph naming the
model file, the function and what was expected (exit 2), instead of a traceback.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import traceback
from pathlib import Path
from types import FunctionType
from typing import Iterator

from ..errors import ParityInputError

# Provided hub models live in the environment, so worker processes (--jobs) inherit them.
PROVIDED_ENV = "PARITY_HUB_MODELS"


class MissingHubModel(ParityInputError):
    """The model's code loads a hub model by id that is neither in the offline cache nor provided locally."""

    def __init__(self, hub_id: str, model: Path, caller: str, cause: str):
        self.hub_id = hub_id
        super().__init__(
            f"{caller} of the model in {model} loads `{hub_id}` from the Hugging Face hub while the model is "
            f"built, and it is not in the offline cache ({_hub_cache()}; {cause}). parity never downloads. "
            f"Provide it either way: download it once where there is network (`huggingface-cli download "
            f"{hub_id}`) and set HF_HOME to that cache's home folder (the one holding hub/models--"
            f"{hub_id.replace('/', '--')}/), or pass a local folder holding its config.json and weights: "
            f"`--hub-model {hub_id}=/path/to/folder` (parity.reference.modelcode.provide in Python)."
        )


def _hub_cache() -> str:
    try:
        from huggingface_hub import constants

        return f"HF_HOME={constants.HF_HOME}, hub cache {constants.HF_HUB_CACHE}"
    except Exception:  # pragma: no cover - huggingface_hub always comes with transformers
        return f"HF_HOME={os.environ.get('HF_HOME', '~/.cache/huggingface')}"


def provide(hub_id: str, folder: Path | str) -> None:
    """Serve `hub_id` from a local folder whenever a model's code asks for it (this process only)."""
    folder = Path(folder).expanduser()
    if "/" not in hub_id or hub_id.startswith(("/", ".")):
        raise ParityInputError(f"--hub-model {hub_id}={folder}: expected a hub id like org/name before '='.")
    if not (folder / "config.json").is_file():
        raise ParityInputError(
            f"--hub-model {hub_id}={folder}: {folder / 'config.json'} is missing; expected the folder of a "
            "downloaded hub model (its config.json and weights)."
        )
    mapping = {k: str(v) for k, v in provided().items()}
    mapping[hub_id] = str(folder.resolve())
    os.environ[PROVIDED_ENV] = json.dumps(mapping, sort_keys=True)


def parse_hub_model(arg: str) -> tuple[str, Path]:
    """`ID=PATH` as given on the command line."""
    hub_id, sep, path = arg.partition("=")
    if not sep or not hub_id or not path:
        raise ParityInputError(f"--hub-model {arg!r}: expected ID=PATH, e.g. openai/clip-vit-large-patch14-336=/models/clip.")
    return hub_id.strip(), Path(path.strip())


def provided() -> dict[str, Path]:
    """hub id -> local folder, as given to `provide` in this process or a parent."""
    try:
        mapping = json.loads(os.environ.get(PROVIDED_ENV) or "{}")
    except ValueError:
        raise ParityInputError(f"Environment variable {PROVIDED_ENV} is not JSON; expected {{hub id: folder}}.") from None
    return {str(k): Path(v) for k, v in mapping.items()}


def model_frame(frames, model: Path) -> traceback.FrameSummary | None:
    """The innermost frame of the model's own code (its folder, or transformers' copy of its modules)."""
    found = None
    for frame in frames:
        name = frame.filename
        if "transformers_modules" in name or Path(name).parent == model:
            found = frame
    return found


def _describe(frame: traceback.FrameSummary | None) -> str:
    if frame is None:
        return "The model's code"
    return f"{Path(frame.filename).name} ({frame.name}, line {frame.lineno})"


def _classes_with_own_from_pretrained(roots) -> list[type]:
    """`roots` and every subclass of them (loaded so far) that holds its own `from_pretrained`: a model's
    override, or one some library left behind (see parity/patching.py). Each is wrapped, so none shadows
    the resolution."""
    found, seen, stack = list(roots), set(roots), list(roots)
    while stack:
        for sub in stack.pop().__subclasses__():
            if sub not in seen:
                seen.add(sub)
                stack.append(sub)
                if "from_pretrained" in vars(sub):
                    found.append(sub)
    return found


@contextlib.contextmanager
def resolving_hub_models(model: Path) -> Iterator[list[str]]:
    """While the model is built: provided hub ids go to their folders, and a hub id that cannot be resolved
    becomes MissingHubModel. Yields the hub ids the model's code asked for.

    Covers `from_pretrained` on PreTrainedModel and PretrainedConfig and on every subclass that has its own
    (a subclass-level attribute would otherwise bypass the base-class wrapper)."""
    from transformers import PretrainedConfig, PreTrainedModel

    from ..patching import patched

    asked: list[str] = []
    local = provided()

    def wrap(raw):
        def call(cls, name, *args, **kwargs):  # the owner's own entry, bound as attribute access would bind it
            bound = raw.__get__(None, cls) if isinstance(raw, (classmethod, staticmethod, FunctionType)) else raw
            return bound(name, *args, **kwargs)

        def from_pretrained(cls, name, *args, **kwargs):
            key = str(name)
            if key in local:
                asked.append(key)
                return call(cls, str(local[key]), *args, **kwargs)
            if os.path.isdir(key) or "/" not in key or key.startswith(("/", ".", "~")):
                return call(cls, name, *args, **kwargs)
            asked.append(key)
            try:
                return call(cls, name, *args, **kwargs)
            except MissingHubModel:  # said by a wrapper further in (a subclass's own from_pretrained)
                raise
            except OSError as e:
                caller = model_frame(traceback.extract_stack(), model)
                first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                raise MissingHubModel(key, model, _describe(caller), first) from None
        return classmethod(from_pretrained)

    with contextlib.ExitStack() as stack:
        for cls in _classes_with_own_from_pretrained((PreTrainedModel, PretrainedConfig)):
            stack.enter_context(patched(cls, "from_pretrained", wrap(vars(cls)["from_pretrained"])))
        yield asked


def apply_clip_geometry(model) -> list[str]:
    """Set every CLIP embeddings' image size to what its (resized) position table holds; say what changed."""
    applied = []
    for name, module in model.named_modules():
        table = getattr(module, "position_embedding", None)
        patch = getattr(module, "patch_size", None)
        if type(module).__name__ != "CLIPVisionEmbeddings" or table is None or not patch:
            continue
        rows = int(table.weight.shape[0])
        grid = math.isqrt(rows - 1)
        if grid * grid + 1 != rows or grid * patch == module.image_size:
            continue
        old, new = int(module.image_size), grid * patch
        module.image_size = new
        module.num_patches = grid * grid
        module.num_positions = rows
        applied.append(
            f"applied: {name}.image_size {old} -> {new} (the model's resize_pos() left a {grid}x{grid} position "
            f"table under a {old}-px CLIP config, which transformers refuses for {new}-px images; lmdeploy's "
            "vision loader sets the same value, lmdeploy/vl/model/xcomposer2.py; in this process only, the "
            "model folder is unchanged)"
        )
    return applied


def model_code_error(exc: BaseException, model: Path, doing: str, expected: str) -> ParityInputError:
    """One paragraph for an exception raised in (or under) the model's own code."""
    frame = model_frame(traceback.extract_tb(exc.__traceback__), model)
    first = (str(exc).strip().splitlines() or [""])[0]
    return ParityInputError(
        f"{_describe(frame)} of the model in {model} raised {type(exc).__name__}: {first} while {doing}. "
        f"Expected {expected}."
    )
