"""Test environment: offline hub, CPU DeepSpeed, small shared fixtures (tiny tokenizer trained locally)."""
import os

for _k, _v in {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "GRADIO_ANALYTICS_ENABLED": "False",
    "DS_ACCELERATOR": "cpu",
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(_k, _v)

import pytest  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than ~20 s (multi-process training, full CLIs)")
    config.addinivalue_line("markers", "gpu: needs CUDA")
    config.addinivalue_line("markers", "vllm: needs the vLLM environment of scripts/serve_vllm.sh (.venv-vllm)")


def pytest_collection_modifyitems(config, items):
    import torch

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    """A Llama-style SentencePiece tokenizer folder trained in the test session (seconds, no download)."""
    from piip_llava.data.tokenizer import train_sentencepiece_tokenizer

    out = tmp_path_factory.mktemp("tokenizer")
    train_sentencepiece_tokenizer(out_dir=str(out), vocab_size=512)
    return str(out)


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from piip_llava.data.tokenizer import load_tokenizer

    return load_tokenizer(tokenizer_dir)
