"""Fuzz campaign: mutated engine files must fail with EngineFileError, or load and give identical outputs.

    python benchmarks/fuzz_engine_files.py --cases 10000 --workers 2 --timeout 60
    python benchmarks/fuzz_engine_files.py --cases 2000 --signed     # every load given a trusted key
    python benchmarks/fuzz_engine_files.py --cases 3000 --model transformer

A small engine (by default a conv → bn → relu → conv → pool → linear net, 5 steps; with
--model transformer an embedding + encoder layer + head, ~40 steps) is built and saved;
each case is a mutation of that file, loaded and run in a worker subprocess with a per-case
timeout (a worker that overruns is killed and counted as a hang; one that dies, as a crash).
Mutations: bit flips and byte edits anywhere or in the JSON header, truncation, appended and
spliced bytes; header edits written back with kiln's own writer (digest recomputed, so only
validation stands in the way: values replaced, deleted, duplicated, tweaked, op names swapped
for dangerous ones); safetensors index edits (dtype, shape, offsets, metadata) without a new
digest; deep nesting, huge sizes and foreign content.

Each case's outcome:
  error          kiln.EngineFileError at load (the file is refused)
  kiln_error     another KilnError at load (e.g. DeviceMismatchError: device_type edited to cuda)
  identical      loaded, and the outputs equal the original's bit for bit (a change that means nothing)
  different      loaded and ran, outputs differ: a *valid* engine computing something else, which
                 only a header edit with a recomputed digest can produce (signing is what refuses
                 these: run with --signed)
  call_kiln      loaded, the call raised a KilnError
  raw_load       a non-kiln exception at load          (a defect)
  raw_call       a non-kiln exception at the call      (a defect)
  hang / crash   the worker overran its timeout / died (a defect)
and separately `touched`: any file written outside the case directory (Python audit hooks see
every open-for-write, remove, rename ...) or any change to a directory of canary files.
"""

from __future__ import annotations

import argparse
import collections
import copy
import json
import os
import random
import select
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

OUTCOMES = ("error", "kiln_error", "identical", "different", "call_kiln", "raw_load", "raw_call", "hang", "crash")
DEFECTS = ("raw_load", "raw_call", "hang", "crash")
DANGEROUS_OPS = [
    "aten.from_file.default", "aten.copy_.default", "aten.add.out", "aten.rand.default", "aten.empty.memory_format",
    "aten.set_.source_Storage", "aten._print.default", "aten.native_dropout.default", "aten.fill_.Scalar",
    "aten.bernoulli.default", "aten.resize_.default", "aten.index_put_.default",
]
OTHER_OPS = ["aten.relu.default", "aten.sigmoid.default", "aten.add.Tensor", "aten.mul.Tensor", "aten.view.default",
             "aten.cat.default", "aten.mean.dim", "aten.index_select.default", "aten.embedding.default",
             "kiln.pointwise.default", "kiln.conv_bias_act.default", "kiln.linear_act.default",
             "aten.scaled_dot_product_attention.default", "aten.arange.start_step", "aten.full.default"]
INTERESTING = [None, True, False, 0, 1, -1, 2, 3, 7, 64, 2**31 - 1, 2**31, 2**32 + 1, 2**40, 2**63 - 1, 2**63, 2**64,
               10**30, -(2**63) - 1, 0.5, -1e300, 1e300, "", "x" * 4000, "\x1b[2J", "float32", "int8", "bool", "cuda",
               "cpu", "buffer", "slice", "view", "heap", "input", "aten", "kiln.reference", "planner.concat_in_place",
               "relu", "none", "__import__", {}, [], [[]], {"slot": 0}, {"slot": 3}, {"slot": 10**6}, {"slot": -1},
               {"weight": "nope"}, {"float": "inf"}, {"float": "1e999"}, {"float": "x"}, {"dtype": "float64"},
               {"dtype": "bogus"}, {"device": "cuda"}, {"tuple": [1, 2]}, {"a": 1, "b": 2}, [1, 1, 1], [0, 0], [-1],
               {"leaf": 0}, {"tuple": []}, {"list": [{"leaf": 0}, {"leaf": 0}]}]


# -- the engine under test ------------------------------------------------------------------------------


def tiny_conv_net() -> tuple[Any, tuple[Any, ...]]:
    import torch
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1),
        nn.ReLU6(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    ).eval()
    return model, (torch.randn(2, 3, 16, 16),)


def tiny_transformer() -> tuple[Any, tuple[Any, ...]]:
    """Embedding → 1 encoder layer (attention, layer norm, GELU MLP) → head: ~40 steps with
    views, attention, kiln's fused ops and pointwise programs."""
    import torch
    from torch import nn

    torch.manual_seed(0)

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(50, 32)
            layer = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True, dropout=0.0, activation="gelu")
            self.enc = nn.TransformerEncoder(layer, 1)
            self.head = nn.Linear(32, 5)

        def forward(self, ids: Any) -> Any:
            return self.head(self.enc(self.emb(ids))).softmax(-1)

    return Model().eval(), (torch.randint(0, 50, (2, 6)),)


MODELS = {"conv": tiny_conv_net, "transformer": tiny_transformer}


# -- mutations (parent) ----------------------------------------------------------------------------------


class Mutator:
    """Case i's mutation is a pure function of (seed, i)."""

    KINDS = [("bitflip", 22), ("byte_set", 8), ("header_bytes", 12), ("truncate", 7), ("append", 4), ("splice", 4),
             ("json_edit", 30), ("op_swap", 4), ("index_edit", 5), ("structural", 4)]

    def __init__(self, base: Path, seed: int):
        from kiln.runtime import engine_file

        self.engine_file = engine_file
        self.data = base.read_bytes()
        (self.n,) = struct.unpack("<Q", self.data[:8])
        self.header, self.weights = engine_file.read(base)
        self.seed = seed
        names, weights = zip(*self.KINDS)
        self.names, self.cum = names, [sum(weights[: i + 1]) for i in range(len(weights))]

    def kind(self, rng: random.Random) -> str:
        x = rng.uniform(0, self.cum[-1])
        return next(n for n, c in zip(self.names, self.cum) if x <= c)

    def make(self, i: int, out: Path) -> str:
        rng = random.Random(f"{self.seed}:{i}")
        kind = self.kind(rng)
        self.note = ""
        getattr(self, kind)(rng, out)
        return kind

    # byte-level
    def bitflip(self, rng: random.Random, out: Path) -> None:
        data = bytearray(self.data)
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        out.write_bytes(bytes(data))

    def byte_set(self, rng: random.Random, out: Path) -> None:
        data = bytearray(self.data)
        for _ in range(rng.randint(1, 4)):
            value = rng.choice([0, 0xFF, ord("{"), ord('"'), ord("9"), ord(","), rng.randrange(256)])
            data[rng.randrange(len(data))] = value
        out.write_bytes(bytes(data))

    def header_bytes(self, rng: random.Random, out: Path) -> None:
        data = bytearray(self.data)
        for _ in range(rng.randint(1, 3)):
            pos = rng.randrange(8 + self.n)
            data[pos] = rng.choice([data[pos] ^ (1 << rng.randrange(8)), ord(rng.choice('0123456789{}[]",:-e. ')),
                                    rng.randrange(256)])
        out.write_bytes(bytes(data))

    def truncate(self, rng: random.Random, out: Path) -> None:
        out.write_bytes(self.data[: rng.randrange(len(self.data))])

    def append(self, rng: random.Random, out: Path) -> None:
        out.write_bytes(self.data + rng.randbytes(rng.randint(1, 512)))

    def splice(self, rng: random.Random, out: Path) -> None:
        a = rng.randrange(len(self.data))
        b = min(len(self.data), a + rng.randint(1, 64))
        middle = rng.randbytes(rng.randint(0, 64)) if rng.random() < 0.5 else b""
        out.write_bytes(self.data[:a] + middle + self.data[b:])

    # header edits, written by kiln's own writer: the digest is right
    def json_edit(self, rng: random.Random, out: Path) -> None:
        header = copy.deepcopy(self.header)
        self.note = "; ".join(_edit(header, rng) for _ in range(rng.randint(1, 3)))
        self._write(header, out)

    def op_swap(self, rng: random.Random, out: Path) -> None:
        header = copy.deepcopy(self.header)
        step = rng.choice(header["plan"]["steps"])
        step["op"] = rng.choice(DANGEROUS_OPS + OTHER_OPS)
        if rng.random() < 0.5:
            step["kernel"] = rng.choice(["aten", "kiln.reference", "planner.concat_in_place"])
        if rng.random() < 0.3:
            step["out_variant"] = None
        self._write(header, out)

    def _write(self, header: dict[str, Any], out: Path) -> None:
        try:
            self.engine_file.write(out, header, self.weights)
        except (TypeError, ValueError, RecursionError):  # not even JSON-serializable: write the original
            out.write_bytes(self.data)

    # safetensors index edits, digest not recomputed
    def index_edit(self, rng: random.Random, out: Path) -> None:
        index = json.loads(self.data[8 : 8 + self.n])
        names = [k for k in index if k != "__metadata__"]
        name = rng.choice(names)
        choice = rng.randrange(7)
        if choice == 0:
            index[name]["dtype"] = rng.choice(["I32", "F16", "BF16", "U8", "BOOL", "F64", "X9", "F8_E4M3"])
        elif choice == 1:
            index[name]["shape"] = list(reversed(index[name]["shape"])) or [1]
        elif choice == 2:
            index[name]["data_offsets"][rng.randrange(2)] += rng.choice([-4, -1, 1, 4, 2**40])
        elif choice == 3:
            index[f"{name}_renamed"] = index.pop(name)
        elif choice == 4:
            meta = index["__metadata__"]
            meta.pop(rng.choice(sorted(meta)))
        elif choice == 5:
            index["__metadata__"]["kiln.version"] = rng.choice(["1", "3", "2.0", "", "x"])
        else:
            a, b = rng.sample(names, 2) if len(names) > 1 else (name, name)
            index[a], index[b] = index[b], index[a]
        raw = json.dumps(index).encode()
        raw += b" " * (-len(raw) % 8)
        out.write_bytes(struct.pack("<Q", len(raw)) + raw + self.data[8 + self.n :])

    def structural(self, rng: random.Random, out: Path) -> None:
        choice = rng.randrange(5)
        if choice == 0:  # deep nesting in the kiln header, digest right
            depth = rng.choice([100, 1000, 10_000, 100_000])
            text = json.dumps(self.header, separators=(",", ":")).replace(
                '"build":{', '"build":{"deep":' + "[" * depth + "]" * depth + ",", 1)
            self._write_header_text(text, out)
        elif choice == 1:  # huge sizes, digest right
            header = copy.deepcopy(self.header)
            plan = header["plan"]
            size = rng.choice([2**31, 2**40, 2**50, 2**63 - 1, 2**64, 10**30])
            target = rng.randrange(4)
            if target == 0:
                plan["memory"]["arena_bytes"] = size
            elif target == 1:
                slot = rng.choice(plan["slots"])
                slot["shape"] = [size] + slot["shape"][1:]
            elif target == 2:
                plan["inputs"][0]["shape"][0] = size
            else:
                rng.choice(plan["slots"]).update(offset=size, nbytes=size)
            self._write(header, out)
        elif choice == 2:
            out.write_bytes(b"\x80\x04" + rng.randbytes(200))  # a pickle-ish blob
        elif choice == 3:
            out.write_bytes(b"PK\x03\x04" + rng.randbytes(300))  # a zip-ish blob
        else:
            out.write_bytes(struct.pack("<Q", rng.choice([0, 1, 2**63, len(self.data)])) + rng.randbytes(100))

    def _write_header_text(self, text: str, out: Path) -> None:
        from safetensors.torch import save as save_safetensors

        ef = self.engine_file
        weights = {k: v.contiguous() for k, v in self.weights.items()}
        entries = [(k, ef._ST_CODES[v.dtype], v.shape, ef._tensor_bytes(v)) for k, v in weights.items()]
        metadata = {"kiln.format": ef.FORMAT, "kiln.version": str(ef.FORMAT_VERSION), "kiln.header": text,
                    "kiln.sha256": ef.digest(text, entries)}
        out.write_bytes(save_safetensors(weights, metadata=metadata))


def _paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(value, dict):
        for k, v in value.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += _paths(v, (*prefix, i))
    return out


def _edit(header: dict[str, Any], rng: random.Random) -> str:
    paths = [p for p in _paths(header) if p]
    if not paths:
        return "nothing left to edit"
    # favour the plan: that is where the runtime looks
    plan_paths = [p for p in paths if p[0] == "plan"]
    path = rng.choice(plan_paths if plan_paths and rng.random() < 0.85 else paths)
    parent = header
    for key in path[:-1]:
        parent = parent[key]
    key = path[-1]
    mode = rng.choice(["replace", "replace", "replace", "delete", "duplicate", "tweak", "tweak", "add", "swap"])
    value = copy.deepcopy(rng.choice(INTERESTING))
    current = parent[key]
    if mode == "delete":
        del parent[key]
    elif mode == "duplicate" and isinstance(parent, list):
        parent.insert(key, copy.deepcopy(current))
    elif mode == "tweak" and isinstance(current, int) and not isinstance(current, bool):
        parent[key] = current + rng.choice([-1, 1, 2, -2, 8, 64, current, -current - 1])
    elif mode == "add" and isinstance(current, dict):
        current[rng.choice(["injected", "slot", "weight", "stream", "fork", "op", "base"])] = value
    elif mode == "swap" and isinstance(parent, list) and len(parent) > 1:
        j = rng.randrange(len(parent))
        parent[key], parent[j] = parent[j], parent[key]
    else:
        mode = "replace"
        parent[key] = value
    return f"{mode} {'/'.join(map(str, path))}" + (f" = {value!r}"[:60] if mode in ("replace", "add") else "")


# -- the worker (a subprocess) ----------------------------------------------------------------------------


def worker(base: str, canaries: str, trusted: str | None, model: str) -> None:
    import torch

    import kiln

    watched: list[tuple[str, str]] = []
    active = [False]

    def audit(event: str, args: tuple) -> None:
        if not active[0]:
            return
        if event == "open":
            path, mode, flags = (tuple(args) + (None, None, None))[:3]
            write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
            if (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                    isinstance(flags, int) and flags & write_flags):
                if not isinstance(path, int) and "__pycache__" not in os.fsdecode(path):
                    watched.append((event, os.fsdecode(path)))
        elif event in ("os.remove", "os.rename", "os.mkdir", "os.rmdir", "os.truncate", "os.chmod", "os.symlink",
                       "os.link", "shutil.rmtree", "shutil.move", "shutil.copyfile", "os.system", "subprocess.Popen",
                       "os.exec", "os.posix_spawn", "socket.connect"):
            watched.append((event, repr(args)[:200]))

    sys.addaudithook(audit)

    def snapshot() -> dict[str, tuple[int, int, bytes]]:
        out = {}
        for p in sorted(Path(canaries).rglob("*")):
            if p.is_file():
                st = p.stat()
                out[str(p)] = (st.st_mtime_ns, st.st_size, p.read_bytes())
        out["<cwd>"] = (0, 0, "\n".join(sorted(os.listdir("."))).encode())
        return out

    _, inputs = MODELS[model]()
    keys = [trusted] if trusted else None
    expected = kiln.load(base, trusted_keys=keys)(*inputs)
    before = snapshot()
    print("ready", flush=True)
    for line in sys.stdin:
        path = line.strip()
        watched.clear()
        outcome, detail = "error", ""
        active[0] = True
        try:
            engine = kiln.load(path, trusted_keys=keys)
        except kiln.EngineFileError as exc:
            outcome, detail = "error", str(exc).splitlines()[0][:300]
            engine = None
        except kiln.KilnError as exc:
            outcome, detail, engine = "kiln_error", f"{type(exc).__name__}: {str(exc)[:200]}", None
        except Exception as exc:  # a defect: record it
            outcome, detail, engine = "raw_load", f"{type(exc).__name__}: {str(exc)[:300]}", None
        if engine is not None:
            try:
                got = engine(*inputs)
                same = isinstance(got, torch.Tensor) and got.shape == expected.shape and got.dtype == expected.dtype \
                    and torch.equal(got, expected)
                outcome = "identical" if same else "different"
            except kiln.KilnError as exc:
                outcome, detail = "call_kiln", f"{type(exc).__name__}: {str(exc)[:200]}"
            except Exception as exc:
                outcome, detail = "raw_call", f"{type(exc).__name__}: {str(exc)[:300]}"
            del engine
        active[0] = False
        after = snapshot()
        touched = list(watched) + ([("canary", "changed")] if after != before else [])
        print(json.dumps({"outcome": outcome, "detail": detail, "touched": touched[:5]}), flush=True)


# -- the parent ---------------------------------------------------------------------------------------------


class Worker:
    def __init__(self, args: list[str], log: Path):
        self.args, self.log = args, log
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen(
            self.args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=open(self.log, "a"), text=True,
            bufsize=1, start_new_session=True,
        )
        line = self.readline(600)
        if line != "ready":
            raise RuntimeError(f"worker did not start ({line!r}); see {self.log}")

    def readline(self, timeout: float) -> str | None:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            return None
        line = self.proc.stdout.readline()
        return line.strip() if line else ""

    def run(self, path: Path, timeout: float) -> dict[str, Any]:
        try:
            self.proc.stdin.write(f"{path}\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            self.restart()
            return {"outcome": "crash", "detail": "worker gone before the case", "touched": []}
        line = self.readline(timeout)
        if line is None:
            self.kill()
            self.start()
            return {"outcome": "hang", "detail": f"no answer in {timeout} s", "touched": []}
        if line == "":
            code = self.proc.wait()
            self.start()
            return {"outcome": "crash", "detail": f"worker exited with {code}", "touched": []}
        return json.loads(line)

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()

    def restart(self) -> None:
        self.kill()
        self.start()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", nargs=4, metavar=("BASE", "CANARIES", "TRUSTED", "MODEL"), help=argparse.SUPPRESS)
    parser.add_argument("--model", choices=sorted(MODELS), default="conv", help="the engine to mutate")
    parser.add_argument("--cases", type=int, default=10_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per case before it counts as a hang")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--signed", action="store_true", help="sign the engine and load every case with its key")
    parser.add_argument("--out", type=Path, default=None, help="keep the work directory (cases that were defects)")
    args = parser.parse_args()
    if args.worker:
        base, canaries, trusted, model_name = args.worker
        worker(base, canaries, None if trusted == "-" else trusted, model_name)
        return

    import torch

    import kiln

    work = Path(args.out or tempfile.mkdtemp(prefix="kiln-fuzz-"))
    (work / "cases").mkdir(parents=True, exist_ok=True)
    (work / "defects").mkdir(exist_ok=True)
    canaries = work / "canaries"
    canaries.mkdir(exist_ok=True)
    (canaries / "victim.py").write_text("print('original')\n")
    (canaries / "secret.txt").write_text("the secret\n")
    model, inputs = MODELS[args.model]()
    engine = kiln.build(model, inputs, device="cpu")
    base = work / "base.kiln"
    trusted = "-"
    if args.signed:
        from kiln.runtime.signing import generate_key

        generate_key(work / "fuzz.key", work / "fuzz.pub", overwrite=True)
        engine.save(base, sign_key=work / "fuzz.key")
        trusted = str(work / "fuzz.pub")
    else:
        engine.save(base)
    mutator = Mutator(base, args.seed)
    print(f"kiln {kiln.__version__}, torch {torch.__version__}; engine: {len(engine.plan['steps'])} steps, "
          f"{base.stat().st_size} bytes; {args.cases} cases, {args.workers} workers, timeout {args.timeout} s, "
          f"seed {args.seed}{', signed (trusted key given)' if args.signed else ''}", flush=True)

    counts: collections.Counter = collections.Counter()
    by_kind: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    touched_cases: list[tuple[int, Any]] = []
    defects: list[tuple[int, str, str, str]] = []
    errors_seen: collections.Counter = collections.Counter()
    different: list[tuple[int, str, str]] = []
    lock = threading.Lock()
    next_case = [0]
    started = time.perf_counter()
    cmd = [sys.executable, __file__, "--worker", str(base), str(canaries), trusted, args.model]

    def drive(w: int) -> None:
        runner = Worker(cmd, work / f"worker{w}.log")
        path = work / "cases" / f"case{w}.kiln"
        while True:
            with lock:
                i = next_case[0]
                if i >= args.cases:
                    break
                next_case[0] += 1
            with lock:  # the mutator is shared: one case at a time
                kind = mutator.make(i, path)
                note = mutator.note
            result = runner.run(path, args.timeout)
            with lock:
                outcome = result["outcome"]
                if outcome == "different":
                    different.append((i, kind, note))
                counts[outcome] += 1
                by_kind[kind][outcome] += 1
                if outcome == "error":
                    errors_seen[_rule(result["detail"])] += 1
                if result["touched"]:
                    touched_cases.append((i, result["touched"]))
                if outcome in DEFECTS or result["touched"]:
                    defects.append((i, kind, outcome, result["detail"]))
                    (work / "defects" / f"case{i}_{outcome}.kiln").write_bytes(path.read_bytes())
                done = sum(counts.values())
                if done % 1000 == 0:
                    print(f"  {done} cases, {time.perf_counter() - started:.0f} s: {dict(counts)}", flush=True)
        runner.kill()

    threads = [threading.Thread(target=drive, args=(w,)) for w in range(args.workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started

    total = sum(counts.values())
    print(f"\n{total} cases in {elapsed:.0f} s\n")
    print("| mutation | cases | " + " | ".join(OUTCOMES) + " |")
    print("| --- | --- | " + " | ".join("---" for _ in OUTCOMES) + " |")
    for kind in [k for k, _ in Mutator.KINDS if k in by_kind] + ["all"]:
        c = counts if kind == "all" else by_kind[kind]
        print(f"| {kind} | {sum(c.values())} | " + " | ".join(str(c.get(o, 0)) for o in OUTCOMES) + " |")
    print(f"\nfiles touched outside the case directory: {len(touched_cases)} case(s)")
    clean = total - sum(counts[o] for o in DEFECTS)
    print(f"defects (raw exceptions, hangs, crashes): {sum(counts[o] for o in DEFECTS)}; clean: {clean}/{total}")
    print("\nmost common refusals:")
    for rule, n in errors_seen.most_common(12):
        print(f"  {n:6d}  {rule}")
    for i, kind, outcome, detail in defects[:30]:
        print(f"  defect: case {i} ({kind}) {outcome}: {detail}")
    for i, kind, note in different[:30]:
        print(f"  valid but different: case {i} ({kind}) {note}")
    if not args.out:
        print(f"\n(work directory: {work})")


def _rule(message: str) -> str:
    """A refusal message without the file path and numbers, to count refusals by rule."""
    import re

    text = re.sub(r"/\S+", "PATH", message)
    text = re.sub(r"\d+", "N", text)
    return text[:110]


if __name__ == "__main__":
    main()
