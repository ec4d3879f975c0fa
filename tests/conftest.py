import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
ASSETS = ROOT.parent / "shared" / "assets"  # real public data, present on the project's machines only

# The test models are far too small to share between threads: on a busy 2-core machine two threads are many
# times slower than one
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def smollm():
    """(model, tokenizer) of the small default model in fp32, loaded once; skipped when not installed."""
    from errors import UserError
    from loaders import default_model_path, load

    try:
        default_model_path()
    except UserError as e:
        pytest.skip(str(e))
    return load()
