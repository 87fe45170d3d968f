"""Canonical inputs: one description of a case, from which both sides' calls are built.

Building the HF call (`inputs_embeds`, `im_mask`) and the engine call (`input_ids` with placeholder ids
at image rows, `input_embeddings`, `input_embedding_ranges`) from one `PreparedInput` makes the two sides
see the same rows by construction; the content hashes let the comparator prove it afterwards.
"""

from __future__ import annotations

import hashlib
import json
import typing
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
import yaml
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ParityInputError, followable
from .records import BosPolicy, CanonicalInput, Chat, EngineCall, HFCall, PreparedInput, Segment

# lmdeploy puts this id at image rows of `input_ids` (IMAGE_DUMMY_TOKEN_INDEX); the rows are overwritten.
PLACEHOLDER_ID = 0

SYSTEM = "[UNUSED_TOKEN_146]system\nYou are a helpful assistant.[UNUSED_TOKEN_145]\n"


def default_cases(image: Path) -> list[CanonicalInput]:
    """The built-in case: system text, one image, a question (XComposer2's chat template). Given as a chat too,
    so a sub-type that places its image elsewhere (2.5: before the template) is laid out by each side's code."""
    return [
        CanonicalInput(
            name="default",
            segments=(
                Segment("text", text=SYSTEM + "[UNUSED_TOKEN_146]user\n"),
                Segment("image", image=image),
                Segment("text", text="What is in the image?[UNUSED_TOKEN_145]\n[UNUSED_TOKEN_146]assistant\n"),
            ),
            chat=Chat("What is in the image?", (image,), "You are a helpful assistant."),
        )
    ]


class _Schema(BaseModel):
    """Inputs-file records: strict types, and a key no model declares is an error rather than ignored."""

    model_config = ConfigDict(extra="forbid", strict=True)


class SegmentSpec(_Schema):
    """One segment: exactly one of `text` (the literal text) or `image` (a path relative to the inputs file)."""

    text: Optional[str] = None
    image: Optional[str] = None

    @model_validator(mode="after")
    def _one_kind(self) -> "SegmentSpec":
        if (self.text is None) == (self.image is None):
            raise ValueError("expected exactly one of `text: str` or `image: path`")
        if self.image is not None and "\0" in self.image:
            raise ValueError(f"image path {self.image!r} contains a NUL byte")
        return self


class ChatSpec(_Schema):
    """A case as one chat turn: each side places the images where its own code does (`records.Chat`)."""

    query: str
    images: list[str] = Field(default_factory=list)
    system: str = ""


class CaseSpec(_Schema):
    name: Optional[str] = None
    bos_policy: BosPolicy = "first"
    segments: Optional[list[SegmentSpec]] = Field(None, min_length=1)
    chat: Optional[ChatSpec] = None

    @model_validator(mode="after")
    def _one_form(self) -> "CaseSpec":
        if (self.segments is None) == (self.chat is None):
            raise ValueError("expected exactly one of `segments: [...]` or `chat: {query, images, system}`")
        return self

    @field_validator("name", mode="before")
    @classmethod
    def _number_as_name(cls, v: Any) -> Any:
        """YAML reads `name: 2024` as a number; a number is a fine case name."""
        return str(v) if isinstance(v, int) and not isinstance(v, bool) else v


class InputsFile(_Schema):
    """`cases: [{name?, bos_policy?, segments: [{text} | {image}] | chat: {query, images?, system?}}]` (a bare
    list of cases is accepted too)."""

    cases: list[CaseSpec] = Field(min_length=1)


def _where(loc: Sequence[Any]) -> str:
    """A pydantic location as the user would write it: cases[0].segments[1]."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "the top level"


def _model_at(loc: Sequence[Any]) -> type[BaseModel] | None:
    """The schema model that holds the thing at `loc` (for listing the keys it allows)."""
    def unwrap(t: Any) -> Any:  # Optional[X] -> X
        args = typing.get_args(t)
        return next(a for a in args if a is not type(None)) if type(None) in args else t

    t: Any = InputsFile
    for part in loc:
        t = unwrap(t)
        if isinstance(part, int):
            t = typing.get_args(t)[0] if typing.get_args(t) else None
        elif isinstance(t, type) and issubclass(t, BaseModel) and part in t.model_fields:
            t = t.model_fields[part].annotation
        else:
            return None
    t = unwrap(t)
    return t if isinstance(t, type) and issubclass(t, BaseModel) else None


def _schema_message(path: Path, err: ValidationError) -> str:
    """The first schema error in one sentence: the key or field, where it is, and what is allowed there."""
    e = err.errors(include_url=False)[0]
    loc = tuple(e["loc"])
    if e["type"] == "extra_forbidden":
        model = _model_at(loc[:-1])
        allowed = ", ".join(model.model_fields) if model else "?"
        return (f"Inputs file {path}: unknown key {loc[-1]!r} at {_where(loc[:-1])}; allowed keys there: "
                f"{allowed}.")
    msg = str(e["msg"]).removeprefix("Value error, ")
    got = f" (got {e['input']!r})" if e["type"] not in ("missing", "value_error") else ""
    more = f" ({err.error_count() - 1} more problem(s) after this one)" if err.error_count() > 1 else ""
    return f"Inputs file {path}, {_where(loc)}: {msg}{got}.{more}"


def _check_image(where: str, img: Path, given: str) -> None:
    """Decode the image now, so a corrupt or non-image file is bad input before any model is loaded."""
    followable(img, f"{where}: image")
    if not img.exists():
        raise ParityInputError(f"{where}: image {given!r} does not exist (looked at {img}).")
    if not img.is_file():
        raise ParityInputError(f"{where}: image {given!r} is not a file (looked at {img}).")
    try:
        with Image.open(img) as im:
            im.load()
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as e:
        raise ParityInputError(
            f"{where}: image {given!r} cannot be decoded ({img}: {str(e).splitlines()[0] if str(e) else type(e).__name__}); "
            "expected a PNG/JPEG/... file Pillow can read."
        ) from None


def load_cases(path: Path | str) -> list[CanonicalInput]:
    """Read an inputs file (YAML or JSON) against `InputsFile`, and decode its images up front."""
    path = Path(path)
    if not path.is_file():
        raise ParityInputError(f"Inputs file {path} does not exist; expected a YAML/JSON file with a `cases` list.")
    try:
        data = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError, RecursionError) as e:
        raise ParityInputError(f"Inputs file {path} does not parse as YAML/JSON: {str(e).splitlines()[0]}.") from None
    if isinstance(data, list):
        data = {"cases": data}
    if not isinstance(data, dict):
        raise ParityInputError(f"Inputs file {path}: expected a mapping with a non-empty `cases` list.")
    try:
        spec = InputsFile.model_validate(data)
    except ValidationError as e:
        raise ParityInputError(_schema_message(path, e)) from None
    except RecursionError:
        raise ParityInputError(f"Inputs file {path} is nested too deeply to be an inputs file.") from None
    cases, names = [], set()
    for n, raw in enumerate(spec.cases):
        where = f"Inputs file {path}, cases[{n}]"
        name = raw.name if raw.name is not None else f"case{n}"
        if name in ("", ".", "..") or any(c in name for c in "/\\\0"):
            raise ParityInputError(
                f"{where}.name {name!r} cannot be used: a case name names a folder, so it must be non-empty, not "
                "'.' or '..', and free of '/', '\\' and NUL."
            )
        if name in names:
            raise ParityInputError(f"{where}: the case name {name!r} is used twice; names must be unique.")
        names.add(name)
        segs = []
        for m, s in enumerate(raw.segments or ()):
            if s.text is not None:
                segs.append(Segment("text", text=s.text))
                continue
            img = path.parent / s.image
            _check_image(f"{where}.segments[{m}]", img, s.image)
            segs.append(Segment("image", image=img.resolve()))
        chat = None
        if raw.chat is not None:
            imgs = []
            for m, given in enumerate(raw.chat.images):
                if "\0" in given:
                    raise ParityInputError(f"{where}.chat.images[{m}]: image path {given!r} contains a NUL byte.")
                _check_image(f"{where}.chat.images[{m}]", path.parent / given, given)
                imgs.append((path.parent / given).resolve())
            chat = Chat(raw.chat.query, tuple(imgs), raw.chat.system)
        cases.append(CanonicalInput(name=name, segments=tuple(segs), bos_policy=raw.bos_policy, chat=chat))
    return cases


def prepare(
    case: CanonicalInput,
    tokenize: Callable[[str], list[int]],
    embed_tokens: Callable[[torch.Tensor], torch.Tensor],
    encode_image: Callable[[Path], torch.Tensor],
    bos_id: int,
    decode: Callable[[int], str] = str,
) -> PreparedInput:
    """Lay out the rows of one case. BOS placement follows `case.bos_policy`, explicitly."""
    ids: list[int] = []
    labels: list[str] = []
    is_image: list[bool] = []
    is_bos: list[bool] = []
    rows: list[torch.Tensor] = []
    features: list[torch.Tensor] = []
    ranges: list[tuple[int, int]] = []
    texts: list[str] = []
    first = True
    for seg in case.segments:
        if seg.kind == "text":
            toks = list(tokenize(seg.text))
            bos = case.bos_policy == "every_text" or first
            if bos:
                toks = [bos_id] + toks
            if toks:
                t = torch.tensor(toks, dtype=torch.long)
                rows.append(embed_tokens(t).float())
                ids += toks
                is_image += [False] * len(toks)
                is_bos += [bos] + [False] * (len(toks) - 1) if bos else [False] * len(toks)
                labels += [decode(x) for x in toks]
            texts.append(seg.text)
        else:
            if first:  # lmdeploy's prompt always starts with BOS, even before an image
                t = torch.tensor([bos_id], dtype=torch.long)
                rows.append(embed_tokens(t).float())
                ids.append(bos_id)
                is_image.append(False)
                is_bos.append(True)
                labels.append(decode(bos_id))
            f = encode_image(seg.image).float()
            f = f.reshape(-1, f.shape[-1])
            begin = len(ids)
            ranges.append((begin, begin + f.shape[0]))
            features.append(f)
            rows.append(f)
            ids += [PLACEHOLDER_ID] * f.shape[0]
            is_image += [True] * f.shape[0]
            is_bos += [False] * f.shape[0]
            labels += [f"<img{len(features)}:{k}>" for k in range(f.shape[0])]
            texts.append(f"<image {seg.image.name if seg.image else ''}>")
        first = False
    return PreparedInput(
        name=case.name,
        token_ids=ids,
        image_rows=torch.tensor(is_image, dtype=torch.bool),
        bos_rows=torch.tensor(is_bos, dtype=torch.bool),
        embeddings=torch.cat(rows, dim=0),
        image_features=features,
        ranges=ranges,
        bos_policy=case.bos_policy,
        placeholder_id=PLACEHOLDER_ID,
        text_parts=texts,
        row_labels=labels,
    )


def _digest(*parts: bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(len(p).to_bytes(8, "little"))
        h.update(p)
    return h.hexdigest()[:16]


def _tensor_bytes(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().float().numpy().tobytes()


def rows_hash(embeddings: torch.Tensor, image_rows: Sequence[bool]) -> str:
    """Hash of what a side's layer 0 receives: the embedding rows and which of them are image rows."""
    mask = bytes(int(bool(x)) for x in image_rows)
    return _digest(_tensor_bytes(embeddings), mask)


def hf_call(p: PreparedInput) -> HFCall:
    return HFCall(
        inputs_embeds=p.embeddings.unsqueeze(0),
        im_mask=p.image_rows.unsqueeze(0),
        content_hash=rows_hash(p.embeddings, p.image_rows.tolist()),
    )


def engine_call(p: PreparedInput) -> EngineCall:
    ids = json.dumps(p.token_ids).encode()
    feats = b"".join(_tensor_bytes(f) for f in p.image_features)
    rng = json.dumps(p.ranges).encode()
    return EngineCall(
        input_ids=list(p.token_ids),
        input_embeddings=[f.clone() for f in p.image_features],
        input_embedding_ranges=list(p.ranges),
        content_hash=_digest(ids, feats, rng),
    )


def engine_rows(call: EngineCall, embed_tokens: Callable[[torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows an engine call *asks for*, looked up in the reference's own embedding table, and the image
    mask its ranges imply. Comparing these with the HF call checks the inputs, not the engine's weights.
    Ranges that do not fit are clipped; whether the engine accepts them is the engine's business."""
    ids = torch.tensor(call.input_ids, dtype=torch.long)
    rows = embed_tokens(ids).float().clone()
    mask = torch.zeros(len(call.input_ids), dtype=torch.bool)
    for (b, e), emb in zip(call.input_embedding_ranges, call.input_embeddings):
        b, e = max(0, int(b)), min(len(call.input_ids), int(e))
        if e <= b:
            continue
        emb = emb.float().reshape(-1, rows.shape[-1])
        n = min(e - b, emb.shape[0])
        rows[b:b + n] = emb[:n]
        mask[b:e] = True
    return rows, mask
