"""Shared fixtures. Expensive artefacts (converted model, tiny models, data) live in the flexrank cache, so
they are built once per machine, not once per test run."""

import os

# flexrank first, as in a run: its import-time guards (log filters, no Hub kernels) must precede the test modules'
# imports of transformers, peft and bitsandbytes
import flexrank  # noqa: F401
import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_configure(config):
    """Under pytest-xdist (the README's `-n 2`), each worker is one of two test processes sharing the cores: one
    torch thread each (two multi-threaded torch jobs on 2 cores slow each other ~10x), and the processes the tests
    launch inherit it."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    """`gpu`-marked tests need CUDA: skipped, with the reason, where there is none (run tests/gpu/run.sh on a
    GPU machine). Their CPU twins run everywhere."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none here); on a GPU machine run tests/gpu/run.sh")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def tiny_llama_config(vocab_size: int = 1000, layers: int = 2):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=vocab_size, initializer_range=0.2, tie_word_embeddings=False)


@pytest.fixture(scope="session")
def tiny_llama_dir():
    """A random 2-layer Llama with SmolLM2's real tokenizer and chat template, saved once in the cache."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    from flexrank.io import cache_dir
    from flexrank.io import atomic_path
    from flexrank.models.assets import smollm2_dir

    out = cache_dir("test-models") / "tiny-llama"
    if not (out / "config.json").exists():
        tok = AutoTokenizer.from_pretrained(smollm2_dir())
        torch.manual_seed(0)
        model = LlamaForCausalLM(tiny_llama_config(vocab_size=len(tok)))
        model.config.pad_token_id = model.config.eos_token_id = tok.eos_token_id
        with atomic_path(out, keep_existing=True) as tmp:  # concurrent test workers: the first one wins
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
    return out


@pytest.fixture()
def tiny_llama():
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config()).eval()


@pytest.fixture()
def batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 1000, (2, 12), generator=g)
    return {"input_ids": ids, "labels": ids.clone()}
