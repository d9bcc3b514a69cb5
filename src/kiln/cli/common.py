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

console = Console(highlight=False)
err = Console(stderr=True, highlight=False)

# The vocabularies the options take. Kept here so `kiln -h` needs no torch import; tests check
# them against the builder's, the planner's and the bench's own tables.
PRECISIONS = ("fp32", "fp16", "bf16")
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


def precision_option(default: str = "fp16") -> Any:
    return typer.Option(
        default, "--precision", parser=choice(*PRECISIONS), metavar="|".join(PRECISIONS),
        help="Engine precision (fp16/bf16 need a CUDA GPU; on the CPU kiln builds fp32 and says so).",
    )


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
