"""Breadth campaign: Hugging Face architectures outside kiln's zoo, built into fp32 CPU engines.

For each model (random weights from a tiny config: 2 layers, width 64, vocabulary 1000) it
checks, against eager fp32 (relative error <= tests/numerics.REL_TOL["fp32"]):

  static    kiln.build(model, inputs) at the example shapes (inputs as keywords: input_ids,
            attention_mask with real padding zeros, token_type_ids, decoder_input_ids, ...);
  dynamic   one engine with kiln.Dim over batch (1..4) and the sequence (4..32, or the
            model's own axis), run at min, max and sizes between;
  roundtrip save -> kiln.load of the dynamic engine (the static one where dynamic failed)
            gives the same answers as before saving.

Each model runs in its own process (a crash or a hang is that model's result); the result per
stage is ok / mismatch (worst relative error) / exception (type and first line).

    PYTHONPATH=src python benchmarks/breadth_text.py [NAME ...] [--group text|decoder|seq2seq|vision|audio]
        [--timeout 300] [--out breadth.jsonl]

Not a test (tests/test_breadth_text.py builds a few cheap ones in CI).
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from numerics import REL_TOL, leaves, rel_error  # noqa: E402

VOCAB = 1000
BATCH, SEQ = 2, 16  # example inputs (the dynamic engine's opt)
BATCH_RANGE, SEQ_RANGE = (1, 4), (4, 32)
DEC_SEQ, DEC_RANGE = 8, (2, 16)  # decoder_input_ids of an encoder-decoder

# BERT-style config fields at the campaign's size.
BERTISH = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=2, intermediate_size=128, vocab_size=VOCAB)
# Decoder-only (Llama-style field names).
LLAMAISH = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=128, vocab_size=VOCAB, max_position_embeddings=128)
# BART-style encoder-decoder.
BARTISH = dict(d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
               encoder_ffn_dim=128, decoder_ffn_dim=128, vocab_size=VOCAB, max_position_embeddings=128)
# ViT-style image encoders at 32x32.
VITISH = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=2, intermediate_size=128, image_size=32,
              patch_size=8)
# wav2vec2-style audio encoders.
W2VISH = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=2, intermediate_size=128, conv_dim=(32,) * 7,
              num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4)


@dataclasses.dataclass(frozen=True)
class Case:
    """model: transformers class name; config: its config class name and fields; inputs: one
    of INPUTS' kinds; group: for running a chunk."""

    model: str
    config: str
    fields: dict[str, Any]
    inputs: str
    group: str
    encoder_only: bool = False  # build model.get_encoder() (an encoder-decoder's encoder)


def _case(model: str, config: str, inputs: str, group: str, **fields: Any) -> Case:
    encoder_only = fields.pop("encoder_only", False)
    return Case(model, config, fields, inputs, group, encoder_only)


CASES: dict[str, Case] = {
    # text encoders
    "albert": _case("AlbertModel", "AlbertConfig", "text", "text", embedding_size=32, **BERTISH),
    "electra": _case("ElectraModel", "ElectraConfig", "text", "text", embedding_size=32, **BERTISH),
    "deberta": _case("DebertaModel", "DebertaConfig", "text", "text", relative_attention=True,
                     pos_att_type=["p2c", "c2p"], **BERTISH),
    "deberta-v2": _case("DebertaV2Model", "DebertaV2Config", "text", "text", relative_attention=True,
                        position_buckets=64, pos_att_type=["p2c", "c2p"], max_relative_positions=-1,
                        norm_rel_ebd="layer_norm", share_att_key=True, **BERTISH),
    "mobilebert": _case("MobileBertModel", "MobileBertConfig", "text", "text", embedding_size=32,
                        intra_bottleneck_size=32, true_hidden_size=32, num_feedforward_networks=2, **BERTISH),
    "xlm-roberta": _case("XLMRobertaModel", "XLMRobertaConfig", "text", "text", type_vocab_size=1, **BERTISH),
    "mpnet": _case("MPNetModel", "MPNetConfig", "text", "text", **BERTISH),
    "convbert": _case("ConvBertModel", "ConvBertConfig", "text", "text", embedding_size=64, **BERTISH),
    "funnel": _case("FunnelModel", "FunnelConfig", "text", "text", block_sizes=[1, 1], num_decoder_layers=1,
                    d_model=64, n_head=2, d_head=32, d_inner=128, vocab_size=VOCAB),
    "layoutlm": _case("LayoutLMModel", "LayoutLMConfig", "layout", "text", **BERTISH),
    "clip-text": _case("CLIPTextModel", "CLIPTextConfig", "text", "text", max_position_embeddings=64,
                       **{k: v for k, v in BERTISH.items()}),
    "siglip-text": _case("SiglipTextModel", "SiglipTextConfig", "ids", "text", max_position_embeddings=64,
                         **BERTISH),
    # decoders (prefill, no cache)
    "opt": _case("OPTModel", "OPTConfig", "text", "decoder", hidden_size=64, num_hidden_layers=2,
                 num_attention_heads=2, ffn_dim=128, vocab_size=VOCAB, max_position_embeddings=128,
                 word_embed_proj_dim=64),
    "gpt-neo": _case("GPTNeoModel", "GPTNeoConfig", "text", "decoder", hidden_size=64, num_layers=2, num_heads=2,
                     attention_types=[[["global", "local"], 1]], window_size=8, intermediate_size=128,
                     vocab_size=VOCAB, max_position_embeddings=128),
    "gpt-neox": _case("GPTNeoXModel", "GPTNeoXConfig", "text", "decoder", hidden_size=64, num_hidden_layers=2,
                      num_attention_heads=2, intermediate_size=128, vocab_size=VOCAB, rotary_pct=0.25,
                      max_position_embeddings=128),
    "gptj": _case("GPTJModel", "GPTJConfig", "text", "decoder", n_embd=64, n_layer=2, n_head=2, rotary_dim=16,
                  vocab_size=VOCAB, n_positions=128),
    "bloom": _case("BloomModel", "BloomConfig", "text", "decoder", hidden_size=64, n_layer=2, n_head=2,
                   vocab_size=VOCAB),
    "falcon": _case("FalconModel", "FalconConfig", "text", "decoder", hidden_size=64, num_hidden_layers=2,
                    num_attention_heads=2, vocab_size=VOCAB),
    "mistral": _case("MistralModel", "MistralConfig", "text", "decoder", sliding_window=8, **LLAMAISH),
    "qwen2": _case("Qwen2Model", "Qwen2Config", "text", "decoder", **LLAMAISH),
    "phi": _case("PhiModel", "PhiConfig", "text", "decoder", partial_rotary_factor=0.5,
                 **{**LLAMAISH, "num_key_value_heads": 4}),
    "gemma": _case("GemmaModel", "GemmaConfig", "text", "decoder", head_dim=16, **LLAMAISH),
    "mixtral": _case("MixtralModel", "MixtralConfig", "text", "decoder", num_local_experts=4,
                     num_experts_per_tok=2, **LLAMAISH),
    # the same MoE through transformers' batched experts (plain torch ops, no custom op)
    "mixtral-batched": _case("MixtralModel", "MixtralConfig", "text", "decoder", num_local_experts=4,
                             num_experts_per_tok=2, experts_implementation="batched_mm", **LLAMAISH),
    "mamba": _case("MambaModel", "MambaConfig", "ids", "decoder", hidden_size=64, num_hidden_layers=2,
                   vocab_size=VOCAB, state_size=8),
    # encoder-decoders: the full forward with decoder_input_ids, and the encoder alone
    "bart": _case("BartModel", "BartConfig", "seq2seq", "seq2seq", **BARTISH),
    "bart-encoder": _case("BartModel", "BartConfig", "text", "seq2seq", encoder_only=True, **BARTISH),
    "mbart": _case("MBartModel", "MBartConfig", "seq2seq", "seq2seq", **BARTISH),
    "pegasus": _case("PegasusModel", "PegasusConfig", "seq2seq", "seq2seq", **BARTISH),
    "marian": _case("MarianModel", "MarianConfig", "seq2seq", "seq2seq", pad_token_id=0, decoder_start_token_id=0,
                    decoder_vocab_size=VOCAB, **BARTISH),
    "t5": _case("T5Model", "T5Config", "seq2seq", "seq2seq", d_model=64, d_kv=16, num_heads=4, d_ff=128,
                num_layers=2, num_decoder_layers=2, vocab_size=VOCAB),
    # vision encoders (batch dynamic; 32x32 images)
    "clip-vision": _case("CLIPVisionModel", "CLIPVisionConfig", "image", "vision", **VITISH),
    "siglip-vision": _case("SiglipVisionModel", "SiglipVisionConfig", "image", "vision", **VITISH),
    "vit": _case("ViTModel", "ViTConfig", "image", "vision", **VITISH),
    "deit": _case("DeiTModel", "DeiTConfig", "image", "vision", **VITISH),
    "beit": _case("BeitModel", "BeitConfig", "image", "vision", use_relative_position_bias=True, **VITISH),
    "dinov2": _case("Dinov2Model", "Dinov2Config", "image", "vision", **VITISH),
    "swin": _case("SwinModel", "SwinConfig", "image", "vision", image_size=32, patch_size=2, embed_dim=16,
                  depths=[1, 1], num_heads=[2, 2], window_size=4),
    "convnext": _case("ConvNextModel", "ConvNextConfig", "image", "vision", image_size=32,
                      hidden_sizes=[16, 32], depths=[1, 1], num_stages=2),
    "segformer": _case("SegformerModel", "SegformerConfig", "image", "vision", num_encoder_blocks=2,
                       depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[16, 32], num_attention_heads=[1, 2],
                       patch_sizes=[7, 3], strides=[4, 2], mlp_ratios=[2, 2], downsampling_rates=[1, 4]),
    # audio
    "hubert": _case("HubertModel", "HubertConfig", "waveform", "audio", **W2VISH),
    "wavlm": _case("WavLMModel", "WavLMConfig", "waveform", "audio", num_buckets=32, max_bucket_distance=64,
                   **W2VISH),
    "whisper": _case("WhisperModel", "WhisperConfig", "whisper", "audio", d_model=64, encoder_layers=2,
                     decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=128,
                     decoder_ffn_dim=128, vocab_size=VOCAB, num_mel_bins=16, max_source_positions=50,
                     max_target_positions=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                     decoder_start_token_id=1, suppress_tokens=[], begin_suppress_tokens=[]),
    "speech2text": _case("Speech2TextModel", "Speech2TextConfig", "speech2text", "audio", d_model=64,
                         encoder_layers=2, decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
                         encoder_ffn_dim=128, decoder_ffn_dim=128, vocab_size=VOCAB, input_feat_per_channel=16,
                         conv_channels=32, max_source_positions=256, max_target_positions=64),
}


# --- inputs -----------------------------------------------------------------------------
# Each kind: (sizes -> inputs dict, the dims by input name, the sizes to check). Sizes are a
# dict of dim name -> size; a kind's first entry in CHECK_SIZES is the example (opt).


def _mask(batch: int, seq: int) -> torch.Tensor:
    """Real padding: row b keeps its first seq - 3b positions (at least one), the rest are 0."""
    mask = torch.ones(batch, seq, dtype=torch.long)
    for b in range(1, batch):
        mask[b, max(1, seq - 3 * b):] = 0
    return mask


def _ids(g: torch.Generator, batch: int, seq: int) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, seq), generator=g)


def _accepts(model: torch.nn.Module, name: str) -> bool:
    return name in inspect.signature(model.forward).parameters


def text_inputs(model: torch.nn.Module, g: torch.Generator, s: dict[str, int]) -> dict[str, torch.Tensor]:
    b, n = s["batch"], s["seq"]
    out = {"input_ids": _ids(g, b, n), "attention_mask": _mask(b, n)}
    types = getattr(model.config, "type_vocab_size", 0)
    if types and _accepts(model, "token_type_ids"):
        out["token_type_ids"] = torch.randint(0, types, (b, n), generator=g)
    return out


def ids_inputs(model: torch.nn.Module, g: torch.Generator, s: dict[str, int]) -> dict[str, torch.Tensor]:
    return {"input_ids": _ids(g, s["batch"], s["seq"])}


def layout_inputs(model: torch.nn.Module, g: torch.Generator, s: dict[str, int]) -> dict[str, torch.Tensor]:
    out = text_inputs(model, g, s)
    corners = torch.randint(0, 500, (s["batch"], s["seq"], 2), generator=g)
    out["bbox"] = torch.cat([corners, corners + torch.randint(0, 500, corners.shape, generator=g)], -1)
    return out


def seq2seq_inputs(model: torch.nn.Module, g: torch.Generator, s: dict[str, int]) -> dict[str, torch.Tensor]:
    out = text_inputs(model, g, s)
    out["decoder_input_ids"] = _ids(g, s["batch"], s["dec"])
    return out


def image_inputs(model: torch.nn.Module, g: torch.Generator, s: dict[str, int]) -> dict[str, torch.Tensor]:
    size = getattr(model.config, "image_size", 32)
    if isinstance(size, (list, tuple)):
        size = size[0]
    return {"pixel_values": torch.randn(s["batch"], 3, size, size, generator=g)}


def waveform_inputs(model: torch.nn.Module, g: torch.Generator, s: dict[str, int]) -> dict[str, torch.Tensor]:
    return {"input_values": torch.randn(s["batch"], s["samples"], generator=g)}


def whisper_inputs(model: torch.nn.Module, g: torch.Generator, s: dict[str, int]) -> dict[str, torch.Tensor]:
    c = model.config
    return {"input_features": torch.randn(s["batch"], c.num_mel_bins, 2 * c.max_source_positions, generator=g),
            "decoder_input_ids": _ids(g, s["batch"], s["dec"])}


def speech2text_inputs(model: torch.nn.Module, g: torch.Generator, s: dict[str, int]) -> dict[str, torch.Tensor]:
    b, n = s["batch"], s["frames"]
    return {"input_features": torch.randn(b, n, model.config.input_feat_per_channel, generator=g),
            "attention_mask": _mask(b, n), "decoder_input_ids": _ids(g, b, s["dec"])}


MakeInputs = Callable[[torch.nn.Module, torch.Generator, dict[str, int]], dict[str, torch.Tensor]]


@dataclasses.dataclass(frozen=True)
class InputKind:
    make: MakeInputs
    axes: dict[str, dict[int, str]]  # input name -> {axis: dim name}
    ranges: dict[str, tuple[int, int]]  # dim name -> (min, max)
    sizes: list[dict[str, int]]  # the example first, then the sizes checked


TEXT_AXES = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"},
             "token_type_ids": {0: "batch", 1: "seq"}}
TEXT_RANGES = {"batch": BATCH_RANGE, "seq": SEQ_RANGE}
TEXT_SIZES = [dict(batch=BATCH, seq=SEQ), dict(batch=1, seq=4), dict(batch=4, seq=32), dict(batch=3, seq=9),
              dict(batch=1, seq=32), dict(batch=4, seq=5)]
DEC_SIZES = [dict(s, dec=d) for s, d in zip(TEXT_SIZES, (DEC_SEQ, 2, 16, 5, 16, 3))]
BATCH_SIZES = [dict(batch=BATCH), dict(batch=1), dict(batch=4), dict(batch=3)]

INPUTS: dict[str, InputKind] = {
    "text": InputKind(text_inputs, TEXT_AXES, TEXT_RANGES, TEXT_SIZES),
    "ids": InputKind(ids_inputs, {"input_ids": {0: "batch", 1: "seq"}}, TEXT_RANGES, TEXT_SIZES),
    "layout": InputKind(layout_inputs, {**TEXT_AXES, "bbox": {0: "batch", 1: "seq"}}, TEXT_RANGES, TEXT_SIZES),
    "seq2seq": InputKind(seq2seq_inputs, {**TEXT_AXES, "decoder_input_ids": {0: "batch", 1: "dec"}},
                         {**TEXT_RANGES, "dec": DEC_RANGE}, DEC_SIZES),
    "image": InputKind(image_inputs, {"pixel_values": {0: "batch"}}, {"batch": BATCH_RANGE}, BATCH_SIZES),
    "waveform": InputKind(waveform_inputs, {"input_values": {0: "batch", 1: "samples"}},
                          {"batch": BATCH_RANGE, "samples": (1000, 4000)},
                          [dict(batch=2, samples=2000), dict(batch=1, samples=1000), dict(batch=4, samples=4000),
                           dict(batch=3, samples=1601)]),
    "whisper": InputKind(whisper_inputs, {"input_features": {0: "batch"}, "decoder_input_ids": {0: "batch", 1: "dec"}},
                         {"batch": BATCH_RANGE, "dec": DEC_RANGE},
                         [dict(batch=2, dec=DEC_SEQ), dict(batch=1, dec=2), dict(batch=4, dec=16),
                          dict(batch=3, dec=5)]),
    "speech2text": InputKind(speech2text_inputs,
                             {"input_features": {0: "batch", 1: "frames"}, "attention_mask": {0: "batch", 1: "frames"},
                              "decoder_input_ids": {0: "batch", 1: "dec"}},
                             {"batch": BATCH_RANGE, "frames": (8, 64), "dec": DEC_RANGE},
                             [dict(batch=2, frames=32, dec=DEC_SEQ), dict(batch=1, frames=8, dec=2),
                              dict(batch=4, frames=64, dec=16), dict(batch=3, frames=21, dec=5)]),
}


# --- one model --------------------------------------------------------------------------


class EncoderOf(torch.nn.Module):
    """An encoder-decoder's encoder, called with the encoder's keyword inputs."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.encoder = model.get_encoder()
        self.config = model.config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Any:
        return self.encoder(input_ids=input_ids, attention_mask=attention_mask)


def make_model(case: Case) -> torch.nn.Module:
    import transformers

    config = getattr(transformers, case.config)(**case.fields)
    config.use_cache = False
    cls = getattr(transformers, case.model)
    try:
        model = cls._from_config(config, attn_implementation="sdpa")
    except (ValueError, ImportError):
        model = cls._from_config(config, attn_implementation="eager")
    model = model.eval()
    return EncoderOf(model).eval() if case.encoder_only else model


def worst_error(got: Any, want: Any) -> tuple[float, str]:
    """The largest relative error over the outputs (inf when the structure differs)."""
    g, w = leaves(got), leaves(want)
    if len(g) != len(w):
        return float("inf"), f"{len(g)} outputs, expected {len(w)}"
    worst, where = 0.0, ""
    for i, (y, ref) in enumerate(zip(g, w)):
        if y.shape != ref.shape or y.dtype != ref.dtype:
            return float("inf"), f"output {i}: {tuple(y.shape)} {y.dtype} vs {tuple(ref.shape)} {ref.dtype}"
        if not ref.is_floating_point():
            err = 0.0 if torch.equal(y, ref) else float("inf")
        elif not torch.isfinite(ref).all():
            same = torch.equal(torch.isfinite(y), torch.isfinite(ref))
            err = rel_error(y[torch.isfinite(ref)], ref[torch.isfinite(ref)]) if same else float("inf")
        else:
            err = rel_error(y, ref)
        if err > worst:
            worst, where = err, f"output {i}"
    return worst, where


def compare(run: Callable[..., Any], model: torch.nn.Module, inputs: dict[str, torch.Tensor], label: str) -> dict:
    with torch.no_grad():
        want = model(**inputs)
    got = run(**inputs)
    err, where = worst_error(got, want)
    ok = err <= REL_TOL["fp32"]
    return {"result": "ok" if ok else "mismatch", "error": err, "where": f"{label} {where}".strip()}


def first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


def stage(fn: Callable[[], dict]) -> dict:
    t0 = time.perf_counter()
    try:
        out = fn()
    except Exception as e:  # noqa: BLE001 - every failure is a result
        out = {"result": "exception", "error": first_line(e)}
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def worst(results: list[dict]) -> dict:
    bad = [r for r in results if r["result"] != "ok"]
    return max(bad, key=lambda r: r["error"]) if bad else max(results, key=lambda r: r["error"])


def run_one(name: str) -> dict:
    import kiln

    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    case = CASES[name]
    kind = INPUTS[case.inputs]
    model = make_model(case)
    g = torch.Generator().manual_seed(0)
    example = {k: v for k, v in kind.make(model, g, kind.sizes[0]).items()}
    report: dict[str, Any] = {"model": name}
    engines: dict[str, Any] = {}

    def static() -> dict:
        engines["static"] = kiln.build(model, dict(example), device="cpu")
        return compare(engines["static"], model, example, "")

    def dynamic() -> dict:
        dims = {d: kiln.Dim(d, min=lo, max=hi) for d, (lo, hi) in kind.ranges.items()}
        shapes = {k: {a: dims[d] for a, d in kind.axes[k].items()} for k in example if k in kind.axes}
        engines["dynamic"] = kiln.build(model, dict(example), device="cpu", dynamic_shapes=shapes)
        checks = [compare(engines["dynamic"], model, kind.make(model, g, s), str(s)) for s in kind.sizes]
        return worst(checks)

    def roundtrip() -> dict:
        which = "dynamic" if "dynamic" in engines else "static"
        engine = engines[which]
        sizes = kind.sizes if which == "dynamic" else kind.sizes[:1]
        probes = [kind.make(model, g, s) for s in sizes]
        before = [engine(**p) for p in probes]
        with tempfile.TemporaryDirectory() as tmp:
            engine.save(f"{tmp}/m.kiln")
            loaded = kiln.load(f"{tmp}/m.kiln")
        errs = [worst_error(loaded(**p), b) for p, b in zip(probes, before)]
        err = max(e for e, _ in errs)
        return {"result": "ok" if err == 0.0 else "mismatch", "error": err, "where": which}

    report["static"] = stage(static)
    report["dynamic"] = stage(dynamic)
    report["roundtrip"] = stage(roundtrip) if engines else {"result": "skipped", "error": 0.0}
    return report


# --- the campaign -----------------------------------------------------------------------


def run_isolated(name: str, timeout: float) -> dict:
    cmd = [sys.executable, __file__, "--one", name]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"model": name, "static": {"result": "exception", "error": f"timeout after {timeout:.0f} s"}}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
    return {"model": name, "static": {"result": "exception", "error": f"process exit {proc.returncode}: {tail}"}}


def summary(stage_result: dict | None) -> str:
    if not stage_result:
        return "-"
    r = stage_result["result"]
    if r == "ok":
        return "ok"
    if r == "mismatch":
        return f"mismatch {stage_result['error']:.1e} ({stage_result.get('where', '')})"
    return f"{r}: {stage_result.get('error', '')}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="models (default: all, or --group)")
    parser.add_argument("--group", choices=sorted({c.group for c in CASES.values()}))
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per model")
    parser.add_argument("--out", type=Path, help="append one JSON line per model")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(run_one(args.one)))
        return 0
    unknown = [n for n in args.names if n not in CASES]
    if unknown:
        parser.error(f"unknown models {unknown}; known: {', '.join(CASES)}")
    names = args.names or [n for n, c in CASES.items() if args.group in (None, c.group)]
    for name in names:
        t0 = time.perf_counter()
        result = run_isolated(name, args.timeout)
        result["seconds"] = round(time.perf_counter() - t0, 1)
        if args.out:
            with args.out.open("a") as f:
                f.write(json.dumps(result) + "\n")
        cells = " | ".join(summary(result.get(s)) for s in ("static", "dynamic", "roundtrip"))
        print(f"| {name} | {cells} | {result['seconds']} s |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
