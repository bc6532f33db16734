import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from common import load_note, measured_copy_bandwidth  # noqa: E402


@pytest.fixture(scope="session")
def copy_bandwidth() -> float:
    """Bytes/s of a large copy on this machine, measured once per session."""
    return measured_copy_bandwidth()


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["machine_note"] = load_note()
    output_json["torch"] = torch.__version__
    output_json["threads"] = torch.get_num_threads()
