"""The GPU side by side: rollout tokens/s against `model.generate`, and step times against TRL 1.16.

    python bench/gpu/gpu_bench.py --out OUTDIR --tokenizer bench/gpu/carry/tokenizer   # what check.sh runs
    python bench/gpu/gpu_bench.py --dry-run --out /tmp/gpu-dry  # the same plumbing on the CPU, tiny, < 1 min

Random-weight models (nothing can be downloaded on the GPU machine) with real shapes and SmolLM2's real
tokenizer: `smollm2-135m` (SmolLM2-135M's config) and `qwen2.5-1.5b` (Qwen2.5-1.5B's shape: hidden 1536,
28 layers, 12 heads, 2 kv heads, intermediate 8960, vocabulary 151,936, tied embeddings; the token ids stay
below SmolLM2's 49,152, which changes nothing in the cost). Inputs: bench/gpu/data (the first 96 rows of
shared/bench-data). Stages, each in its own process so that one failing (or crashing the CUDA context)
only writes its error and the next one runs; a stage that would pass the deadline is skipped, saying so:

1. generate/<shape>: builds the model directory, then B=64 prompts x 64 new tokens, T 1.0, no EOS stop,
   bf16, warm (one untimed run each), median of `--repeats` runs of each of: rlhfkit's RolloutEngine with
   the static CUDA-graph backend (`cuda_static`), the same without graphs, the HF StaticCache path
   (`hf_static`), the DynamicCache path (`generic`), and plain `model.generate` (what TRL's GRPO calls
   without vLLM). Plus the mismatch of the cuda_static rollout's log-probs against a bf16 HF forward of
   the same tokens (`losses.logprob_mismatch`). The peak GPU memory of each variant (reset before each).
2. train/<shape>/<side>: SFT, RM, DPO, GRPO through the CPU bench's workers (bench/gpu/gpu_worker.py),
   `--warmup` + `--steps` steps, medians; rlhfkit with train.device=cuda, train.precision=auto. The peak
   GPU memory of each trainer, and the sampler/trainer mismatch the rlhfkit trainers log in metrics.jsonl.

Writes OUTDIR/results.json (every stage's record or error, as it goes) and OUTDIR/results.md
(bench/gpu/gpu_report.py); check.log gets each stage's peak GPU memory as it ends.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))
from gpu_report import markdown, stage_peaks  # noqa: E402  (bench/gpu is not a package)

SHAPES: dict[str, dict[str, Any]] = {
    "smollm2-135m": dict(
        model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, head_dim=64, vocab_size=49152,
        tie_word_embeddings=True, rope_theta=100000.0, rms_norm_eps=1e-5, max_position_embeddings=8192,
    ),
    "qwen2.5-1.5b": dict(
        model_type="qwen2", hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
        num_attention_heads=12, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True,
        rope_theta=1000000.0, rms_norm_eps=1e-6, max_position_embeddings=32768, use_sliding_window=False,
    ),
    "tiny": dict(
        model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, vocab_size=49152, tie_word_embeddings=True,
    ),
}  # fmt: skip
BIG = {"qwen2.5-1.5b"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")


# ----------------------------------------------------------------------------------------- stage: generate
def make_model_dir(shape: str, tokenizer_dir: str | None, out: Path, device: str) -> dict[str, Any]:
    """A random-weight model of `shape` (bf16 safetensors) with the tokenizer beside it; returns notes."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    out.mkdir(parents=True, exist_ok=True)
    notes: dict[str, Any] = {}
    if tokenizer_dir and (Path(tokenizer_dir) / "tokenizer.json").is_file():
        for name in TOKENIZER_FILES:
            if (Path(tokenizer_dir) / name).is_file():
                shutil.copy(Path(tokenizer_dir) / name, out / name)
        try:
            tok = AutoTokenizer.from_pretrained(out)
        except Exception as exc:  # an older transformers than the one that wrote tokenizer_config.json
            notes["tokenizer_class_fallback"] = f"{type(exc).__name__}: {exc}"[:300]
            cfg_path = out / "tokenizer_config.json"
            cfg = json.loads(cfg_path.read_text())
            cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
            cfg_path.write_text(json.dumps(cfg))
            tok = AutoTokenizer.from_pretrained(out)
        notes["tokenizer"] = "SmolLM2-135M's"
    else:
        from rlhfkit.models.tiny import make_tokenizer

        tok = make_tokenizer()
        tok.save_pretrained(out)
        notes["tokenizer"] = (
            "rlhfkit.models.tiny's character-level tokenizer (no SmolLM2 tokenizer was carried)"
        )
    spec = dict(SHAPES[shape])
    kind = spec.pop("model_type")
    if shape == "tiny":  # the vocabulary the tokenizer needs (the output layer dominates a tiny model)
        spec["vocab_size"] = 64 * -(-len(tok) // 64)
    spec["vocab_size"] = max(spec["vocab_size"], len(tok))
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    config = AutoConfig.for_model(kind, **spec, **ids)
    torch.manual_seed(0)
    with torch.device(device):  # random init on the GPU: seconds, not a minute of CPU for 1.5B
        try:
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        except TypeError:  # a transformers that does not take dtype here
            model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    model.save_pretrained(out)
    notes["parameters"] = sum(p.numel() for p in model.parameters())
    del model
    return notes


def timed(fn: Any, repeats: int, sync: Any) -> list[float]:
    fn()  # warm: graph capture, allocator, kernels' first launch
    out = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - t0)
    return out


def run_generate(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from bench_rollout import chat_prompts, hf_generate
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhfkit import losses
    from rlhfkit.rollout import RolloutEngine, SamplingConfig, left_pad

    record: dict[str, Any] = {"model_dir": args.model_dir}
    record.update(make_model_dir(args.shape, args.tokenizer, Path(args.model_dir), args.device))
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=dtype).to(args.device).eval()
    tok = AutoTokenizer.from_pretrained(args.model_dir)
    prompts = chat_prompts(tok, f"{args.data_dir}/grpo_prompts.jsonl", args.batch)
    prompts = (prompts * (args.batch // len(prompts) + 1))[: args.batch]
    b, t = len(prompts), args.new_tokens
    config = SamplingConfig(max_new_tokens=t, temperature=1.0, stop_at_eos=False)
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    ids, mask = left_pad(prompts, pad)
    ids, mask = ids.to(args.device), mask.to(args.device)
    record.update(
        batch=b, new_tokens=t, prompt_lengths=[min(map(len, prompts)), ids.shape[1]], dtype=str(dtype)
    )
    variants: dict[str, Any] = {}
    for name in args.variants.split(","):
        if name == "hf_generate":
            variants[name] = lambda: hf_generate(model, ids, mask, pad, t)
            continue
        backend, _, graphs = name.partition(":")  # cuda_static:off
        if graphs:
            os.environ["RLHFKIT_CUDA_GRAPHS"] = graphs
        engine = RolloutEngine(model, tok, backend=backend)
        os.environ.pop("RLHFKIT_CUDA_GRAPHS", None)
        gen = torch.Generator().manual_seed(0)
        variants[name] = lambda engine=engine, gen=gen: engine.generate(prompts, config, gen)
    results: dict[str, Any] = {}
    cuda = args.device == "cuda"
    for name, fn in variants.items():
        if cuda:  # each variant's own peak: the model's weights plus its cache, graphs and logits
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        try:
            seconds = timed(fn, args.repeats, sync)
            med = statistics.median(seconds)
            results[name] = {"seconds": seconds, "median_s": med, "tokens_per_s": b * t / med}
        except Exception as exc:  # one variant failing leaves the others' numbers
            results[name] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
        if cuda:
            results[name]["gpu_peak_bytes"] = torch.cuda.max_memory_allocated()
        print(f"  {name}: {results[name]}", flush=True)
    record["variants"] = results
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    try:  # do the fast path's log-probs agree with the trainer's forward, on this GPU, in bf16?
        engine = RolloutEngine(model, tok)
        r = engine.generate(prompts, config, torch.Generator().manual_seed(1))
        record["auto_backend"] = engine.backend_name
        lps = []
        with torch.no_grad():
            for lo in range(0, b, 8):
                sl = slice(lo, lo + 8)
                logits = model(
                    input_ids=r.input_ids[sl].to(args.device),
                    attention_mask=r.attention_mask[sl].to(args.device),
                    position_ids=r.position_ids[sl].to(args.device),
                ).logits[:, r.completion_start - 1 : -1]  # (8, T, V)
                lp = torch.log_softmax(logits.float(), -1).gather(
                    -1, r.completion_ids[sl, :, None].to(args.device)
                )
                lps.append(lp.squeeze(-1).cpu())
        m = losses.logprob_mismatch(r.logprobs, torch.cat(lps), r.completion_mask)
        record["mismatch_vs_hf_forward"] = {k: float(v) for k, v in m.items()}
    except Exception as exc:
        record["mismatch_vs_hf_forward"] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
    if cuda:
        record["mismatch_gpu_peak_bytes"] = torch.cuda.max_memory_allocated()
    return record


# ----------------------------------------------------------------------------------------------- driver
class Driver:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.work = Path(args.work)
        self.work.mkdir(parents=True, exist_ok=True)
        self.deadline = args.deadline or (time.time() + args.budget)
        self.results: dict[str, Any] = {
            "command": args.command,
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        self.results["environment"] = environment()
        self.results["stages"] = {}
        if args.pytest_log:
            self.results["pytest_cuda"] = pytest_summary(Path(args.pytest_log), args.pytest_rc)
        self.save()

    def save(self) -> None:
        (self.out / "results.json").write_text(json.dumps(self.results, indent=1, default=str))

    def stage(self, name: str, cmd: list[str], min_seconds: float, read: Any) -> None:
        """Run one stage's process with what is left of the budget; record its result or its error."""
        left = self.deadline - time.time() - 5
        stages = self.results["stages"]
        if left < min_seconds:
            stages[name] = {
                "error": f"skipped: {left:.0f} s left of the budget, the stage needs ~{min_seconds:.0f}"
            }
            print(f"{name}: skipped (budget)", flush=True)
            self.save()
            return
        print(f"{name}: running (up to {left:.0f} s)", flush=True)
        t0 = time.time()
        log = self.work / (name.replace("/", "_") + ".log")
        try:
            with log.open("w") as fh:
                code = subprocess.run(
                    cmd, stdout=fh, stderr=subprocess.STDOUT, timeout=left, env=child_env()
                ).returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
        tail = log.read_text(errors="replace").strip().splitlines()[-12:]
        try:
            record = read()
        except Exception as exc:
            record = {"error": [f"exit {code}; no result ({type(exc).__name__}: {exc})", *tail]}
        if code != 0:
            record.setdefault("error", [f"exit {code}", *tail])
        record["stage_seconds"] = time.time() - t0
        stages[name] = record
        print(f"{name}: {'FAILED ' if 'error' in record else ''}{time.time() - t0:.0f} s; peak GPU memory: "
              f"{stage_peaks(record)}", flush=True)  # fmt: skip
        self.save()

    def run(self) -> None:
        """Per shape, smallest first: generation, then rlhfkit's and TRL's trainers (so a tight budget loses
        the big shape's last stages, not a whole kind of measurement)."""
        a = self.args
        py = sys.executable
        max_length = 256 if a.tokenizer else 1024  # a character-level fallback tokenizer needs ~1024
        for shape in a.shapes.split(","):
            model_dir = self.work / "models" / shape
            out = self.work / f"generate-{shape}.json"
            variants, repeats = a.variants, a.repeats
            if shape in BIG:  # the launch-bound comparisons are made on the small shape; here the main two
                variants, repeats = a.big_variants, max(3, a.repeats - 2)
            cmd = [py, __file__, "--stage", "generate", "--shape", shape, "--model-dir", str(model_dir),
                   "--stage-out", str(out), "--tokenizer", a.tokenizer or "", "--device", a.device,
                   "--data-dir", a.data_dir, "--batch", str(a.batch), "--new-tokens", str(a.new_tokens),
                   "--repeats", str(repeats), "--variants", variants]  # fmt: skip
            self.stage(f"generate/{shape}", cmd, 20, lambda out=out: json.loads(out.read_text()))
            if not (model_dir / "config.json").is_file():
                self.results["stages"][f"train/{shape}"] = {
                    "error": "no model directory (generate stage failed)"
                }
                self.save()
                continue
            for side in ("rlhfkit", "trl"):
                out_dir = self.work / f"train-{shape}-{side}"
                cmd = [py, str(HERE / "gpu_worker.py"), "--side", side, "--trainers", a.trainers,
                       "--device", a.device, "--precision", a.precision, "--model", str(model_dir),
                       "--data-dir", a.data_dir, "--steps", str(a.steps), "--warmup", str(a.warmup),
                       "--max-length", str(max_length), "--out-dir", str(out_dir)]  # fmt: skip
                self.stage(f"train/{shape}/{side}", cmd, 30, lambda d=out_dir, s=side: read_trainers(d, s, a))
        self.results["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
        self.save()
        (self.out / "results.md").write_text(markdown(self.results, a))
        print((self.out / "results.md").read_text())


def read_trainers(out_dir: Path, side: str, a: argparse.Namespace) -> dict[str, Any]:
    record: dict[str, Any] = {}
    for trainer in a.trainers.split(","):
        path = out_dir / f"{trainer}-{side}.json"
        if not path.is_file():
            record[trainer] = {"error": "no result (the process ended before this trainer)"}
            continue
        r = json.loads(path.read_text())
        if "steps" in r:
            timed_steps = [s["seconds"] for s in r["steps"][r["warmup"] :]]
            r["median_s"] = statistics.median(timed_steps) if timed_steps else None
            r["timed_steps"] = len(timed_steps)
        record[trainer] = r
    return record


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    src = str(REPO / "src")
    env["PYTHONPATH"] = os.pathsep.join([src, str(REPO / "bench"), *filter(None, [env.get("PYTHONPATH")])])
    env.update(
        TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONUNBUFFERED="1"
    )
    return env


def environment() -> dict[str, Any]:
    from importlib import metadata

    import torch

    env: dict[str, Any] = {"python": sys.version.split()[0], "torch": torch.__version__}
    for pkg in ("transformers", "accelerate", "peft", "trl", "datasets", "pyarrow"):
        try:
            env[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            env[pkg] = None
    if torch.cuda.is_available():
        env.update(gpu=torch.cuda.get_device_name(0), cuda=torch.version.cuda)
    return env


def pytest_summary(log: Path, rc: int | None) -> dict[str, Any]:
    lines = log.read_text(errors="replace").strip().splitlines() if log.is_file() else []
    summary = next((x for x in reversed(lines) if x.strip()), "")  # "3 passed, 2 skipped in 9.1s"
    return {
        "exit": rc,
        "summary": summary.strip("= "),
        "failures": [x for x in lines if x.startswith("FAILED")][:20],
    }


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="OUTDIR for results.json and results.md")
    ap.add_argument(
        "--work", default="/tmp/rlhfkit-gpu-check", help="model directories, logs, per-stage JSON"
    )
    ap.add_argument("--tokenizer", default="", help="directory with SmolLM2's tokenizer files")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--shapes", default="smollm2-135m,qwen2.5-1.5b")
    ap.add_argument("--trainers", default="sft,rm,dpo,grpo")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument(
        "--variants",
        default="cuda_static,cuda_static:off,hf_static,generic,hf_generate",
        help="rollout variants: a backend name, ':off' for the graphs off, or hf_generate",
    )
    ap.add_argument("--big-variants", default="cuda_static,hf_static,hf_generate", help="for the 1.5B shape")
    ap.add_argument("--data-dir", default=str(HERE / "data"))
    ap.add_argument("--budget", type=float, default=420.0, help="seconds for every stage together")
    ap.add_argument("--deadline", type=float, default=0.0, help="epoch seconds (check.sh passes its own)")
    ap.add_argument("--pytest-log", default="")
    ap.add_argument("--pytest-rc", type=int, default=None)
    ap.add_argument("--command", default="")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny model, 2 steps: the plumbing only")
    # one stage, in its own process (the driver's children)
    ap.add_argument("--stage", choices=["generate"], default=None)
    ap.add_argument("--shape", default="")
    ap.add_argument("--model-dir", default="")
    ap.add_argument("--stage-out", default="")
    args = ap.parse_args()
    if args.dry_run:
        args.device, args.shapes, args.steps, args.warmup = "cpu", "tiny", 2, 1
        args.batch, args.new_tokens, args.repeats = 4, 8, 1
        args.variants = "cuda_static,hf_static,generic,hf_generate"
        args.tokenizer = ""  # the character-level tokenizer: a 49k-word output layer is slow on a CPU
    if not args.stage and not args.out:
        ap.error("--out is required")
    return args


def main() -> None:
    args = parse()
    sys.path[:0] = [str(REPO / "src"), str(REPO / "bench")]
    if args.stage == "generate":
        Path(args.stage_out).write_text(json.dumps(run_generate(args), indent=1, default=str))
        return
    Driver(args).run()


if __name__ == "__main__":
    main()
