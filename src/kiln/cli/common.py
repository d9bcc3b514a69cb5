"""What every kiln command shares: consoles, error exits, the option parsers, the shared
options, and tables that fit the terminal.

One parser per kind of value (`parse_batches`, `parse_shape`, `choice`, `parse_device`),
and one definition per shared option (`device_option`, `precision_option`, `batch_option`,
…): the same option means the same thing, and reads the same way, in every command.
Parsers run while the command line is read, before any work; a bad value is a one-line
error naming the option.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from kiln.errors import KilnError

console = Console(highlight=False)
err = Console(stderr=True, highlight=False)

# The vocabularies the options take. Kept here so `kiln -h` needs no torch import; tests check
# them against the builder's, the planner's and the bench's own tables.
PRECISIONS = ("fp32", "fp16", "bf16")
QUANT_PRECISIONS = ("int8", "fp8", "mixed")  # kiln build: need calibration data (--calib)
BUILD_PRECISIONS = (*PRECISIONS, *QUANT_PRECISIONS)
DEBUG_PRECISIONS = ("fp16", "bf16", "int8", "fp8")  # kiln debug precision: what is compared with fp32
CALIB_METHODS = ("max", "percentile", "entropy", "mse")
BACKENDS = ("kiln", "tensorrt")
STREAMS = ("auto", "on", "off")
DEVICE_HELP = "cpu, cuda or cuda:N"


# --- errors -----------------------------------------------------------------------------------


def one_line(text: str) -> str:
    """`text` on one line (a message for a terminal or a CI log)."""
    return " ".join(str(text).split())


def err_line(message: str) -> None:
    """Print `error: message` to stderr (markup-safe, never wrapped into several lines)."""
    err.print(f"[red]error:[/] {escape(message)}", soft_wrap=True)


def fail(exc: BaseException | str, code: int = 1) -> typer.Exit:
    """Print `exc` as an error (no traceback, markup-safe) and return the exit to raise."""
    err_line(str(exc))
    return typer.Exit(code)


def bad(message: str) -> typer.BadParameter:
    return typer.BadParameter(message)


def usage(message: str) -> Exception:
    """A command-line mistake across options (exit 2: `kiln CMD: message (see `kiln CMD -h`)`)."""
    try:  # the click that typer uses, as kiln.cli.app catches it
        from typer._click.exceptions import UsageError
    except ImportError:  # pragma: no cover - depends on the installed typer
        from click.exceptions import UsageError  # type: ignore[assignment]
    return UsageError(message)


# --- parsers: one per kind of value ----------------------------------------------------------


def parse_batches(text: str | Sequence[int] | None) -> tuple[int, ...] | None:
    """'1,32' → (1, 32); '8' → (8,); empty → None. Every --batch in kiln is read by this function."""
    if text is None or text == "":
        return None
    if isinstance(text, (tuple, list)):
        return tuple(int(v) for v in text)
    parts = [p.strip() for p in str(text).split(",")]
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        raise bad(f"{text!r} is not a batch size or a list of them, like 8 or 1,32") from None
    if min(values) < 1:
        raise bad(f"batch sizes are positive, got {text!r}")
    return values


def one_batch(text: str | int | None) -> int:
    """A --batch that takes one size (an engine is built for one): parse_batches, then one value."""
    values = parse_batches(str(text) if isinstance(text, int) else text) or (1,)
    if len(values) != 1:
        raise bad(f"this command takes one batch size, got {text!r} (kiln bench takes a list)")
    return values[0]


def batch_or_range(text: str | int | None) -> Any:
    """`kiln build --batch`: N (a fixed size, as one_batch reads it) or MIN:OPT:MAX, a dynamic
    batch (a kiln.Dim named batch: the engine takes any batch in the range)."""
    if text is not None and not isinstance(text, int) and ":" in str(text):
        return parse_range("batch", str(text))
    return one_batch(text)


def parse_range(name: str, text: str | None) -> Any:
    """A dim's range from the command line: MIN:OPT:MAX → kiln.Dim(name, ...); N → N (fixed)."""
    if text is None or text == "":
        return None
    from kiln.shapes import Dim

    try:
        return Dim.parse(name, str(text))
    except ValueError as exc:
        raise bad(str(exc)) from None


def dynamic_shapes_for(example_inputs: Any, batch: Any, seq: Any) -> Any:
    """The `dynamic_shapes` of `kiln build --batch MIN:OPT:MAX [--seq MIN:OPT:MAX]`: the batch
    is axis 0 of every input, the sequence axis 1 of every integer input of rank 2 or more
    (token ids and their masks). None when neither is a range."""
    import torch

    from kiln.shapes import Dim

    batch = batch if isinstance(batch, Dim) else None
    seq = seq if isinstance(seq, Dim) else None
    if batch is None and seq is None:
        return None
    named = isinstance(example_inputs, dict)
    items = list(example_inputs.items()) if named else list(enumerate(
        (example_inputs,) if isinstance(example_inputs, torch.Tensor) else example_inputs))
    found_seq = False
    shapes: dict[Any, dict[int, Dim] | None] = {}
    for key, x in items:
        axes: dict[int, Dim] = {}
        if isinstance(x, torch.Tensor):
            if batch is not None and x.dim() >= 1:
                axes[0] = batch
            if seq is not None and x.dim() >= 2 and not x.is_floating_point():
                axes[1] = seq
                found_seq = True
        shapes[key] = axes or None
    if seq is not None and not found_seq:
        raise bad("--seq: this model has no token input (an integer tensor of rank 2 or more) to give a sequence "
                  "range; use --input-shape for a fixed size")
    if named:
        return {k: v for k, v in shapes.items() if v is not None}
    return tuple(shapes.values())


def parse_shape(text: str | Sequence[int] | None) -> tuple[int, ...] | None:
    """'3,224,224' (or '3x224x224') → (3, 224, 224); empty → None."""
    if text is None or text == "":
        return None
    if isinstance(text, (tuple, list)):
        return tuple(int(v) for v in text)
    parts = [p for p in re.split(r"[,x×]", str(text)) if p.strip()]
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        raise bad(f"{text!r} is not a shape like 3,224,224") from None
    if not shape or min(shape) < 1:
        raise bad(f"{text!r} is not a shape like 3,224,224 (positive sizes)")
    return shape


def _suggest(value: str, options: Sequence[str]) -> str:
    close = difflib.get_close_matches(value, list(options), n=2)
    return f" (did you mean {' or '.join(close)}?)" if close else ""


def choice(*options: str) -> Callable[[str | None], str | None]:
    """A parser accepting exactly one of `options` (the error lists them, and a close match)."""

    def parse(text: str | None) -> str | None:
        if text is None or text in options:
            return text
        raise bad(f"{text!r} is not one of {', '.join(options)}{_suggest(text, options)}")

    return parse


def choices(*options: str, extra: Sequence[str] = ()) -> Callable[[str | Sequence[str] | None], tuple[str, ...] | None]:
    """A parser for a comma-separated list, each item one of `options` (or of `extra`, e.g. 'all')."""

    def parse(text: str | Sequence[str] | None) -> tuple[str, ...] | None:
        if text is None:
            return None
        items = list(text) if isinstance(text, (tuple, list)) else [p.strip() for p in str(text).split(",")]
        items = [p for p in items if p]
        if not items:
            raise bad("give at least one of " + ", ".join(options))
        known = (*options, *extra)
        for item in items:
            if item not in known:
                raise bad(f"{item!r} is not one of {', '.join(known)}{_suggest(item, known)}")
        return tuple(dict.fromkeys(items))

    return parse


def csv(text: str | None) -> list[str]:
    return [part.strip() for part in (text or "").split(",") if part.strip()]


_DEVICE = re.compile(r"^(cpu|cuda(:\d+)?)$")


def parse_device(text: str | None) -> str | None:
    if text is None or _DEVICE.match(text):
        return text
    raise bad(f"{text!r} is not a device: use {DEVICE_HELP}{_suggest(text, ('cpu', 'cuda'))}")


def trusted_paths(paths: Sequence[Path] | None) -> list[Path] | None:
    return list(paths) if paths else None


# --- the shared options ------------------------------------------------------------------------


def device_option(help: str = "Where to build and run") -> Any:
    return typer.Option(
        None, "--device", parser=parse_device, metavar="DEVICE", show_default="cuda when available, else cpu",
        help=f"{help}: {DEVICE_HELP}.",
    )


def load_device_option() -> Any:
    return typer.Option(
        None, "--device", parser=parse_device, metavar="DEVICE", show_default="the kind it was built for",
        help=f"Device to load the engine onto: {DEVICE_HELP}.",
    )


PRECISION_HELP = "Engine precision (fp16/bf16 need a CUDA GPU; on the CPU kiln builds fp32 and says so)."


def precision_option(default: str = "fp16", options: Sequence[str] = PRECISIONS, help: str = PRECISION_HELP) -> Any:
    return typer.Option(default, "--precision", parser=choice(*options), metavar="|".join(options), help=help)


def batch_option(help: str = "Batch size the engine is built for.") -> Any:
    return typer.Option(1, "--batch", parser=one_batch, metavar="N", help=help)


def dynamic_batch_option() -> Any:
    return typer.Option(
        "1", "--batch", parser=batch_or_range, metavar="N|MIN:OPT:MAX",
        help="Batch size the engine is built for, or a range MIN:OPT:MAX (e.g. 1:8:64): one engine for every "
        "batch in it, tuned at OPT, memory planned for MAX.",
    )


def seq_option() -> Any:
    return typer.Option(
        None, "--seq", parser=lambda t: parse_range("seq", t), metavar="MIN:OPT:MAX", show_default=False,
        help="Sequence-length range of token inputs (axis 1 of integer inputs), e.g. 16:128:512.",
    )


def input_shape_option(help: str = "Per-sample input shape, e.g. 3,224,224 (or 128: BERT's sequence length).") -> Any:
    return typer.Option(
        None, "--input-shape", parser=parse_shape, metavar="SHAPE", show_default="the model's", help=help
    )


def trusted_key_option() -> Any:
    return typer.Option(
        None, "--trusted-key", metavar="KEY", exists=True, dir_okay=False,
        help="Public key (from kiln keygen) the engine must be signed with; repeat for several.",
    )


# --- model specs and engine files ---------------------------------------------------------------


def resolve_model(model: str, batch: int = 1, input_shape: tuple[int, ...] | None = None) -> Any:
    """A zoo name or path/to/file.py:factory → the zoo entry, or a one-line error exit."""
    from kiln import zoo
    from kiln.errors import KilnError

    try:
        entry = zoo.resolve(model, batch=batch, input_shape=input_shape)
    except (KilnError, ValueError, TypeError, FileNotFoundError, ImportError, SyntaxError) as exc:
        raise fail(exc) from None
    if getattr(entry, "note", None) and not entry.pretrained:
        console.print(f"[yellow]note:[/] {escape(entry.note)}")
    return entry


NOT_ENGINES = {
    ".onnx": "an ONNX model, not a kiln engine: build an engine with `kiln build MODEL` "
    "(`kiln trt-check` checks ONNX files)",
    ".py": "Python source, not a kiln engine: build one with `kiln build path/to/file.py:factory`",
    ".pt": "a PyTorch checkpoint, not a kiln engine: build one with `kiln build MODEL`",
    ".pth": "a PyTorch checkpoint, not a kiln engine: build one with `kiln build MODEL`",
}


def open_engine(path: Path, device: str | None = None, trusted_keys: Sequence[Path] | None = None) -> Any:
    """Load an engine file, or exit with one line saying why it cannot be loaded."""
    from kiln.errors import KilnError

    if path.is_file() and path.suffix.lower() in NOT_ENGINES:
        raise fail(f"{path} is {NOT_ENGINES[path.suffix.lower()]}")
    try:
        return load_engine(path, device=device, trusted_keys=trusted_keys)
    except (KilnError, ValueError, OSError) as exc:
        raise fail(exc) from None


def load_engine(path: Path | str, device: str | None = None, trusted_keys: Sequence[Path] | None = None) -> Any:
    """kiln.load, passing trusted keys only when some are given (engines load unsigned by default)."""
    from kiln import load

    if trusted_keys:
        return load(path, device=device, trusted_keys=[str(k) for k in trusted_keys])
    return load(path, device=device)


# --- calibration data (--calib) -----------------------------------------------------------------

CALIB_KINDS = "photos (scikit-image's sample photos), a directory of images, a .safetensors or .pt file of input " \
    "tensors, or a .txt file of sentences"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")
TENSOR_SUFFIXES = (".safetensors", ".pt", ".pth")
TEXT_SUFFIXES = (".txt",)
DEFAULT_CALIB_BATCHES = 16  # from photos or a directory; a tensor or text file gives all it holds
HELD_BACK_BATCHES = 4  # photos for the accuracy check: batches of other photos than the calibration ones
# Zoo text models whose tokenizer kiln has offline: BERT's uncased WordPiece vocabulary, shipped with
# MiniLM (kiln.quant.data.minilm_path); the other text models' tokenizers would need a download.
BERT_VOCAB_MODELS = ("bert-tiny", "bert-base", "bert-large", "minilm-l6")


def parse_calib(text: str | None) -> str | None:
    """--calib SRC: 'photos', a directory, or a file of a kind kiln reads (checked before any work)."""
    if text is None or text == "photos":
        return text
    path = Path(text)
    if path.is_dir():
        return text
    if not path.exists():
        raise bad(f"{text!r} is neither 'photos' nor an existing file or directory; pass {CALIB_KINDS}")
    if path.suffix.lower() not in (*TENSOR_SUFFIXES, *TEXT_SUFFIXES):
        raise bad(f"{text}: kiln reads calibration data from {CALIB_KINDS}, not a {path.suffix or 'suffix-less'} file")
    return text


def parse_accuracy(text: str | None) -> str | None:
    """--accuracy TARGET: 'cosine>=0.999' or several joined by commas (kiln.quant.guard's targets)."""
    if text is None:
        return None
    from kiln.quant.guard import parse_targets

    try:
        parse_targets(text)
    except ValueError as exc:
        raise bad(str(exc)) from None
    return text


def calib_option(help: str = "Calibration data") -> Any:
    return typer.Option(None, "--calib", parser=parse_calib, metavar="SRC", show_default=False,
                        help=f"{help}: {CALIB_KINDS}.")


def calib_method_option() -> Any:
    return typer.Option(
        None, "--calib-method", parser=choice(*CALIB_METHODS), metavar="|".join(CALIB_METHODS),
        show_default="entropy; fp8: max", help="How activation ranges are chosen from the calibration data.",
    )


def calib_batches_option() -> Any:
    return typer.Option(
        None, "--calib-batches", metavar="N", min=1, show_default=f"{DEFAULT_CALIB_BATCHES} from photos or a "
        "directory; all of a file", help="Calibrate on at most N batches.",
    )


class CalibrationDataError(KilnError, ValueError):
    """--calib data that cannot be read, or that does not fit the model's inputs."""


@dataclass
class CalibrationData:
    """Input tuples shaped like the model's example inputs, from one --calib SRC."""

    batches: list[tuple[Any, ...]]
    held_back: int  # the last batches are of data set aside for checking (other photos); 0: none set aside
    description: str


@dataclass(frozen=True)
class _Input:
    name: str
    shape: tuple[int, ...]  # per sample, without the batch axis
    dtype: Any


def calibration_data(
    src: str, model: Any, batch: int, limit: int | None = None, held_back: int = 0
) -> CalibrationData:
    """`--calib SRC` as a list of input tuples for `model` (a kiln.zoo.ZooModel: its example inputs
    give each input's per-sample shape and dtype), `batch` samples per tuple, at most `limit`
    tuples. `held_back`: photos only, that many more batches of other photos, at the end."""
    inputs = _model_inputs(model)
    if src == "photos":
        return _photo_data(model, inputs, batch, limit or DEFAULT_CALIB_BATCHES, held_back)
    path = Path(src)
    if path.is_dir():
        return _directory_data(path, model, inputs, batch, limit or DEFAULT_CALIB_BATCHES)
    suffix = path.suffix.lower()
    if suffix in TENSOR_SUFFIXES:
        return _tensor_data(path, inputs, batch, limit)
    if suffix in TEXT_SUFFIXES:
        return _text_data(path, model, inputs, batch, limit)
    raise CalibrationDataError(f"{src}: kiln reads calibration data from {CALIB_KINDS}")


def example_batch(model: Any) -> int:
    """The batch size of a zoo entry's example inputs (what calibration batches must have)."""
    import torch

    example = model.example_inputs
    first = example if isinstance(example, torch.Tensor) else example[0]
    return int(first.shape[0])


def _count(batches: Sequence[Any], batch: int) -> str:
    return f"{len(batches)} batch{'' if len(batches) == 1 else 'es'} of {batch}"


def _model_inputs(model: Any) -> list[_Input]:
    import inspect

    import torch

    example = model.example_inputs
    example = (example,) if isinstance(example, torch.Tensor) else tuple(example)
    try:
        params = [p for p in inspect.signature(model.model.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        params = []
    names = [p.name for p in params[: len(example)]]
    names += [str(i) for i in range(len(names), len(example))]
    return [_Input(n, tuple(x.shape[1:]), x.dtype) for n, x in zip(names, example)]


# images: the photos shipped with scikit-image, or a directory, through the model's preprocessing


def _image_input(model: Any, inputs: list[_Input], src: str) -> _Input:
    only = inputs[0] if len(inputs) == 1 else None
    if only is None or len(only.shape) != 3 or not only.dtype.is_floating_point or only.shape[0] not in (1, 3):
        shapes = ", ".join(f"{i.name} {tuple(i.shape)} {str(i.dtype).removeprefix('torch.')}" for i in inputs)
        raise CalibrationDataError(
            f"--calib {src}: images fit a model with one image input (C, H, W) of 1 or 3 channels; {model.name} "
            f"takes {shapes} per sample: pass a .safetensors file of its input tensors"
        )
    return only


def _image_transform(model: Any, image: _Input, probe: Any) -> tuple[Any, str]:
    """The model's own preprocessing where kiln knows it and it gives the input's size, else
    ImageNet's usual one at that size; grey models get the channels' mean."""
    from kiln.debug.predict import default_transform, model_transform

    size = tuple(image.shape[1:])
    try:
        transform, how = model_transform(model.name, model.family, model.model)
        if tuple(transform(probe).shape[-2:]) != size:
            raise ValueError(f"it gives {tuple(transform(probe).shape[-2:])}, the model takes {size}")
    except Exception:  # unknown family, no weights metadata, another size: the ImageNet default
        transform, how = default_transform(size)  # type: ignore[arg-type]
    if image.shape[0] == 3:
        return transform, how

    def grey(img: Any) -> Any:
        return transform(img).mean(0, keepdim=True)

    return grey, f"{how}, channels averaged to grey"


def _image_batches(images: list[Any], model: Any, image: _Input, batch: int) -> tuple[list[tuple[Any, ...]], str]:
    from kiln.quant.data import image_batches

    transform, how = _image_transform(model, image, images[0])
    batches = image_batches(images, transform, batch)
    return [(b[0].to(image.dtype),) for b in batches], how


def _photo_data(model: Any, inputs: list[_Input], batch: int, count: int, held_back: int) -> CalibrationData:
    from kiln.quant.data import CALIBRATION_PHOTOS, HELD_BACK_PHOTOS, photo_crops

    image = _image_input(model, inputs, "photos")

    def crops(names: Sequence[str], n: int) -> list[Any]:
        names = names[:n]
        return photo_crops(names, -(-n // len(names)))[:n]

    batches, how = _image_batches(crops(CALIBRATION_PHOTOS, count * batch), model, image, batch)
    text = f"{_count(batches, batch)} from scikit-image's photos ({how})"
    held: list[tuple[Any, ...]] = []
    if held_back:
        held, _ = _image_batches(crops(HELD_BACK_PHOTOS, held_back * batch), model, image, batch)
        text += f", then {len(held)} of other photos held back"
    return CalibrationData(batches + held, len(held), text)


def _directory_data(folder: Path, model: Any, inputs: list[Any], batch: int, count: int) -> CalibrationData:
    from PIL import Image

    image = _image_input(model, inputs, str(folder))
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise CalibrationDataError(f"--calib {folder}: no images in it ({', '.join(IMAGE_SUFFIXES)})")
    images = []
    for path in files[: count * batch]:
        try:
            with Image.open(path) as img:
                images.append(img.convert("RGB"))
        except (OSError, ValueError) as exc:
            raise CalibrationDataError(f"--calib: cannot read {path} as an image: {one_line(str(exc))}") from None
    batches, how = _image_batches(images, model, image, batch)
    return CalibrationData(batches, 0, f"{_count(batches, batch)} from {len(images)} images in {folder} "
                           f"({how})")


# tensors: a .safetensors file (no pickle), or a .pt file read with torch.load(weights_only=True)


def _load_tensors(path: Path) -> Any:
    import torch

    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:  # SafetensorError and OSError: a damaged or foreign file
            raise CalibrationDataError(f"--calib: cannot read {path} as safetensors: {one_line(str(exc))}") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError (not plain tensors), EOFError, RuntimeError (damaged)
        raise CalibrationDataError(
            f"--calib: cannot read {path} with torch.load(weights_only=True): {one_line(str(exc))[:200]}; save "
            "plain tensors (a tensor, a tuple or a dict of them), or use .safetensors"
        ) from None


def _by_input(loaded: Any, inputs: list[_Input], path: Path) -> list[Any]:
    """The file's tensors in the model's input order: a dict by input name (or 0, 1, …), a
    tuple or list in input order, or one tensor for a one-input model."""
    import torch

    names = [i.name for i in inputs]
    if isinstance(loaded, torch.Tensor):
        loaded = [loaded]
    if isinstance(loaded, dict) and all(isinstance(v, torch.Tensor) for v in loaded.values()):
        keys = [str(k) for k in loaded]
        values = list(loaded.values())
        if len(values) == 1 and len(names) == 1:
            return values
        for wanted in (names, [str(i) for i in range(len(names))]):
            if sorted(keys) == sorted(wanted):
                return [values[keys.index(n)] for n in wanted]
        raise CalibrationDataError(
            f"--calib {path}: holds tensors named {', '.join(keys)}; the model's inputs are {', '.join(names)}: "
            "name the tensors so (or 0, 1, …)"
        )
    if isinstance(loaded, (tuple, list)) and all(isinstance(v, torch.Tensor) for v in loaded):
        if len(loaded) != len(names):
            raise CalibrationDataError(
                f"--calib {path}: holds {len(loaded)} tensor(s); the model takes {len(names)} ({', '.join(names)})"
            )
        return list(loaded)
    raise CalibrationDataError(
        f"--calib {path}: holds a {type(loaded).__name__}; expected a tensor, a tuple of tensors in input order, "
        "or a dict of tensors by input name"
    )


def _samples(t: Any, spec: _Input, path: Path) -> Any:
    """A file's tensor for one input as (samples, *per-sample shape), in the input's dtype."""
    if tuple(t.shape) == spec.shape:
        t = t.unsqueeze(0)  # one sample
    if tuple(t.shape[1:]) != spec.shape or t.shape[0] == 0:
        raise CalibrationDataError(
            f"--calib {path}: tensor {spec.name} has shape {tuple(t.shape)}; input {spec.name} takes "
            f"(N, {', '.join(map(str, spec.shape))}): N samples of {spec.shape}"
        )
    if t.dtype.is_floating_point != spec.dtype.is_floating_point:
        have, want = (str(d).removeprefix("torch.") for d in (t.dtype, spec.dtype))
        raise CalibrationDataError(f"--calib {path}: tensor {spec.name} is {have}; input {spec.name} takes {want}")
    return t.to(spec.dtype)


def _tensor_data(path: Path, inputs: list[_Input], batch: int, limit: int | None) -> CalibrationData:
    import torch

    tensors = [_samples(t, spec, path) for t, spec in zip(_by_input(_load_tensors(path), inputs, path), inputs)]
    counts = {int(t.shape[0]) for t in tensors}
    if len(counts) != 1:
        sizes = ", ".join(f"{s.name} {int(t.shape[0])}" for s, t in zip(inputs, tensors))
        raise CalibrationDataError(f"--calib {path}: the inputs have different numbers of samples ({sizes})")
    n = counts.pop()
    if limit is not None:
        n = min(n, limit * batch)
    order = torch.arange(-(-n // batch) * batch) % n  # the last batch padded by repeating from the start
    batches = [tuple(t[order[i : i + batch]].contiguous() for t in tensors) for i in range(0, len(order), batch)]
    return CalibrationData(batches, 0, f"{_count(batches, batch)} from {n} samples in {path}")


# sentences: a text file, one sentence a line, through the model's tokenizer


def _tokenizer(model: Any, path: Path) -> Any:
    if model.name not in BERT_VOCAB_MODELS:
        raise CalibrationDataError(
            f"--calib {path}: kiln has no tokenizer offline for {model.name} (it has BERT's, for "
            f"{', '.join(BERT_VOCAB_MODELS)}): pass token ids as a .safetensors file instead"
        )
    import os

    from kiln.quant.data import minilm_path

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    return transformers.AutoTokenizer.from_pretrained(str(minilm_path()), local_files_only=True)


def _text_data(path: Path, model: Any, inputs: list[_Input], batch: int, limit: int | None) -> CalibrationData:
    from kiln.quant.data import token_batches

    tokens = inputs[0]
    if len(inputs) > 2 or len(tokens.shape) != 1 or tokens.dtype.is_floating_point:
        raise CalibrationDataError(
            f"--calib {path}: sentences fit a text model taking token ids (and an attention mask); {model.name} "
            f"takes {', '.join(f'{i.name} {i.shape}' for i in inputs)} per sample: pass a .safetensors file"
        )
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as exc:
        raise CalibrationDataError(f"--calib: cannot read {path} as UTF-8 text: {one_line(str(exc))}") from None
    texts = [line for line in lines if line]
    if not texts:
        raise CalibrationDataError(f"--calib {path}: no sentences in it (one a line)")
    if limit is not None:
        texts = texts[: limit * batch]
    batches = token_batches(_tokenizer(model, path), texts, batch, tokens.shape[0])
    batches = [tuple(x.to(spec.dtype) for x, spec in zip(b, inputs)) for b in batches]
    return CalibrationData(batches, 0, f"{_count(batches, batch)} from {len(texts)} sentences in {path} "
                           f"(BERT's tokenizer, {tokens.shape[0]} tokens)")


# --- tables that fit ----------------------------------------------------------------------------


@dataclass
class Column:
    """A table column; the lowest `keep` are left out first when the table is wider than the terminal."""

    name: str
    keep: int = 5  # 0: left out first … 9: never left out
    justify: str = "left"
    overflow: str = "fold"
    no_wrap: bool = False
    flexible: bool = False  # long text that may wrap: counted as at most FLEXIBLE_WIDTH when fitting


def fitted_table(
    columns: Sequence[Column],
    rows: Sequence[Sequence[str]],
    *,
    title: str | None = None,
    width: int | None = None,
    styles: Sequence[str | None] | None = None,
    **table_args: Any,
) -> Table:
    """A table whose columns fit `width` (the console's): columns are left out, lowest `keep`
    first, until the table's natural width fits; the caption names what was left out.
    `styles`: one rich style per row (or None)."""
    from rich import box

    width = width or console.width
    kept = list(range(len(columns)))
    dropped: list[str] = []
    measured = [[_clip(cell, columns[i].flexible) for i, cell in enumerate(row)] for row in rows]
    while True:
        table = _table(columns, kept, measured, styles, title, table_args, box)
        natural = console.measure(table, options=console.options.update_width(10_000)).maximum
        droppable = [i for i in kept if columns[i].keep < 9]
        if natural <= width or not droppable:
            break
        worst = min(droppable, key=lambda i: (columns[i].keep, -i))
        kept.remove(worst)
        dropped.append(columns[worst].name)
    args = dict(table_args)
    if dropped:
        note = f"left out at {width} columns: {', '.join(dropped)} (widen the terminal, or see --json)"
        args["caption"] = f"{args['caption']}\n{note}" if args.get("caption") else note
    return _table(columns, kept, rows, styles, title, args, box)


FLEXIBLE_WIDTH = 30


def _clip(cell: Any, flexible: bool) -> Any:
    return cell[:FLEXIBLE_WIDTH] if flexible and isinstance(cell, str) else cell


def _table(columns: Sequence[Column], kept: list[int], rows: Sequence[Sequence[str]],
           styles: Sequence[str | None] | None, title: str | None, table_args: dict[str, Any], box: Any) -> Table:
    args = {"box": box.SIMPLE_HEAD, "caption_justify": "left", **table_args}
    table = Table(title=title, **args)
    for i in kept:
        c = columns[i]
        table.add_column(c.name, justify=c.justify, overflow=c.overflow, no_wrap=c.no_wrap)  # type: ignore[arg-type]
    for n, row in enumerate(rows):
        table.add_row(*(row[i] for i in kept), style=styles[n] if styles else None)
    return table
