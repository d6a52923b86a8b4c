"""Memory of a model load, measured in a fresh process (RSS is per process, and pytest's own is large)."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

# VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the forking parent (pytest) across exec.
PROBE = """
import json, sys
from rerankd.backends import torch_backend
from rerankd.engine.loader import load_engine
from rerankd.settings import RuntimeSettings

def status_mb(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) / 1024

torch_backend.cpu_has_bf16_units = lambda: sys.argv[3] == "bf16-units"
torch_backend.int8_may_outrun_bf16 = lambda: False  # auto tries bf16 alone, as on AMX
engine = load_engine(sys.argv[1], RuntimeSettings(dtype=sys.argv[2]))
print(json.dumps({"dtype": engine.info.dtype, "peak": status_mb("VmHWM"), "loaded": status_mb("VmRSS")}))
"""

HAS_PROC_STATUS = Path("/proc/self/status").exists()


@dataclass(frozen=True)
class LoadMemory:
    dtype: str  # what the model was loaded in (auto's choice)
    peak: float  # MB, during the load
    loaded: float  # MB, once loaded


def load_memory(model: Path, dtype: str, bf16_units: bool = False) -> LoadMemory:
    """Load `model` as `rerankd serve` does, on a CPU with or without bf16 units whatever this one has."""
    units = "bf16-units" if bf16_units else "none"
    probe = subprocess.run(
        [sys.executable, "-c", PROBE, str(model), dtype, units], capture_output=True, text=True, timeout=300
    )
    assert probe.returncode == 0, probe.stderr
    return LoadMemory(**json.loads(probe.stdout.splitlines()[-1]))
