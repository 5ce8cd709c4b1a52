import sys
from pathlib import Path

# tests import the shared launcher as `launcher`; the project root makes `megatron_edit` importable.
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
