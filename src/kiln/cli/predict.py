"""`kiln predict MODEL|ENGINE IMAGE…`: top-k ImageNet labels from eager and from the engine."""

from __future__ import annotations

from typing import Any

import typer
from rich.markup import escape

from kiln.cli.app import command
from kiln.cli.common import Column, console, device_option, fail, fitted_table, precision_option


@command("predict")
def predict(
    target: str = typer.Argument(
        ..., metavar="MODEL|ENGINE", show_default=False, help="Zoo classifier name (kiln zoo) or engine file."
    ),
    images: list[str] = typer.Argument(
        None, metavar="IMAGE...", show_default=False,
        help="Image files, or skimage:NAME samples (e.g. skimage:chelsea).",
    ),
    sample: list[str] = typer.Option(
        None, "--sample", metavar="NAME",
        help="A scikit-image sample photograph: chelsea, coffee, astronaut, … (repeat).",
    ),
    topk: int = typer.Option(5, "--topk", metavar="K", min=1, help="How many labels to show."),
    precision: str = precision_option("fp16"),
    device: str = device_option(),
    seed: int = typer.Option(0, "--seed", metavar="N", help="Seed of the zoo's random weights."),
) -> None:
    """Top-k ImageNet labels for images, from eager and the engine.

    Eager and engine predictions side by side, with their agreement.
    """
    from kiln.debug.predict import SKIMAGE_PREFIX
    from kiln.debug.predict import predict as run_predict
    from kiln.errors import KilnError

    specs = [*(images or []), *(SKIMAGE_PREFIX + s for s in sample or [])]
    try:
        report = run_predict(target, specs, topk=topk, precision=precision, device=device, seed=seed)
    except (KilnError, ValueError, OSError, ImportError) as exc:
        raise fail(exc) from None
    for line in predict_lines(report):
        console.print(line)
    for result in report.images:
        console.print(prediction_table(result))
        if result.agreement:
            console.print(agreement_line(result.agreement))


def predict_lines(report: Any) -> list[str]:
    engine = f"{report.precision} engine on {report.device}"
    lines = [f"[bold]{escape(report.model)}[/] ({engine}); preprocessing: {escape(report.preprocessing)}"]
    if report.weights_warning:
        lines.append(f"[bold yellow]warning:[/] {escape(report.weights_warning)}")
    return lines + [f"note: {escape(n)}" for n in report.notes]


def prediction_table(result: Any) -> Any:
    eager = result.eager
    columns = [Column("#", 9, "right"), Column("engine", 9), Column("prob", 8, "right")]
    if eager:
        columns += [Column("eager", 9), Column("prob", 8, "right")]
    rows = []
    for i, (label, prob) in enumerate(zip(result.engine.labels, result.engine.probs, strict=True)):
        row = [str(i + 1), escape(label), f"{prob:.4f}"]
        if eager:
            row += [escape(eager.labels[i]), f"{eager.probs[i]:.4f}"]
        rows.append(row)
    return fitted_table(columns, rows, title=escape(result.image))


def agreement_line(a: Any) -> str:
    color = "green" if a.verdict == "agree" else "yellow" if a.same_top1 else "red"
    return (
        f"[{color}]{a.verdict}[/]: same top-1 {'yes' if a.same_top1 else 'no'}, "
        f"top-{a.k} overlap {a.topk_overlap}/{a.k}, max prob difference {a.max_prob_diff:.2e}"
    )
