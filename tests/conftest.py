import sys
from pathlib import Path

# tests import the shared launcher as `launcher`; the project root makes `megatron_edit` importable.
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: starts training (or other) processes; `make test-fast` leaves it out")
